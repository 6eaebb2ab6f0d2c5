"""The pool-store choice of the CT pretraining bundles: ``configs/pool_store.json`` and its README paragraph.

The default training dataset stays ``CacheDataset`` (fine for pools that fit in memory). ``pool_store.json``, layered
last, replaces it by crops read from a store that ``tools/data/preprocess_pool.py`` built from the same
``train#deterministic_transforms``: ``train#dataset`` becomes a plain ``Dataset`` over the store's volumes (this
rank's shard under DDP), ``train#preprocessing`` only the random transforms, whose first one (the random crop) reads
the crops from the store (``PoolRandCropSamplesd``). Validation reads the store's validation volumes (``PoolLoadd``,
then the same center crop and mask). Everything else that read the datalist reads the store: the check before
training, the data part of the run identity (the store's content) and the pool size of the weights' record, so a run
needs the store alone (no NIfTI file, no datalist), e.g. on a machine the store was copied to.
"""
from __future__ import annotations

STORE = "hybridmim_components.workflow"
POOL_STORE_FILE = "configs/pool_store.json"


def applies(spec) -> bool:
    """Only the CT-pool bundles get the store (BraTS has a few hundred volumes: the cache holds them)."""
    return spec.ct


def pool_store_config() -> dict:
    """``configs/pool_store.json``: layered after ``train.json`` (and ``multi_gpu_train.json``)."""
    return {
        # the folder preprocess_pool.py wrote (manifest.json, volumes/)
        "pool_store_dir": "$@dataset_dir + '/pool_store'",
        "train#random_transforms#0": {
            "_target_": f"{STORE}.PoolRandCropSamplesd",
            "keys": "image",
            "roi_size": "@roi_size",
            "num_samples": "@samples_per_volume",
        },
        # the deterministic part was applied once, by the preprocessor
        "train#preprocessing#transforms": "@train#random_transforms",
        "train#dataset": {
            "_target_": "Dataset",
            # every volume of the store; under DDP this rank's shard (seeded shuffle, equal lengths)
            "data": f"${STORE}.pool_store_entries(@pool_store_dir, roi_size=@roi_size, seed=@seed)",
            "transform": "@train#preprocessing",
        },
        # validation: the store's validation volumes (under DDP this rank's share), center-cropped and masked as before
        "validate#load_from_store": {"_target_": f"{STORE}.PoolLoadd", "keys": "image"},
        "validate#preprocessing#transforms": "$[@validate#load_from_store] + @validate#random_transforms",
        "validate#dataset#data": f"${STORE}.pool_store_entries(@pool_store_dir, roi_size=@roi_size, "
                                 "section='validation')",
        # nothing below reads the NIfTI files or the datalist: the store is checked instead, the run's data
        # identity is the store's content, and the weights' record counts the store's training volumes
        "train#data_check": f"${STORE}.check_pool_store(@pool_store_dir, @roi_size, image_channels=@in_channels, "
                            "enabled=@check_data)",
        "train#run_identity#settings#data": f"${STORE}.pool_store_identity(@pool_store_dir)",
        "train#provenance#record#pool_size": f"$len({STORE}.pool_store_entries(@pool_store_dir, shard=False))",
    }


def readme_paragraph(spec) -> str:
    """The pretraining README's paragraph on the store (appended to its Memory section)."""
    if not applies(spec):
        return ""
    return f"""
A pool too large for the cache (thousands of CTs): preprocess it once into a pool store with the collection's
`tools/data/preprocess_pool.py` (run from the collection's root), then train with `configs/pool_store.json` layered
last. The store holds each volume after `train#deterministic_transforms` as an
uncompressed float32 `.npy` that training memory-maps, reading only the pages its random crops cover; host memory
per process then no longer depends on the pool size, and under DDP each rank reads its own shard of the store.
Give the preprocessor the same overrides as training (e.g. `roi_size`); a rerun skips finished volumes and redoes
changed ones, and unreadable files are named and skipped. The store holds the training and the validation list, so
training needs the store alone (no NIfTI file, no datalist: preprocess on one machine, copy the store, train on
another); the check before training reads the store's files (header and size), the run identity is the store's
content and `pool_size` of `models/model.provenance.json` its number of training volumes:

```bash
python tools/data/preprocess_pool.py bundles/{spec.name} /path/to/data/pool_store --dataset_dir /path/to/data
python -m monai.bundle run --config_file "['configs/train.json','configs/pool_store.json']" \\
    --pool_store_dir /path/to/data/pool_store
```

`pool_store_dir` defaults to `<dataset_dir>/pool_store`; under torchrun list `configs/pool_store.json` after
`configs/multi_gpu_train.json`. A store written before validation volumes were stored is refused with the command
that adds them (finished training volumes are kept).
"""
