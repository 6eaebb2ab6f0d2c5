"""The pool store: ``tools/data/preprocess_pool.py`` and ``hybridmim_components.workflow.pool_store``.

On small generated CTs (0.8 × 0.8 × 1.5 mm, so resampling, the window and the body crop all act): a crop read from the
store equals, voxel for voxel and with the same affine, the crop the bundle's own in-memory pipeline
(``train#deterministic_transforms`` + ``RandSpatialCropSamplesd``) takes from the same volume with the same generator
state; a rerun skips finished volumes, a corrupt file is named and skipped, a changed source is redone; DDP shards
are disjoint and cover the store; the validation crops equal the bundle's too; a pretraining bundle trains through
the CLI from the store alone (the raw NIfTI folder moved away), also under 2-process DDP; the run identity of a store
comes from its content, not its paths; the benchmark runs at a tiny size.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
BUNDLE = os.path.join(REPO_ROOT, "bundles", "hybridmim_unet_pretrain")
ROI = [32, 32, 32]
OVERRIDES = {"roi_size": ROI}


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _pool(root, n_train: int = 3) -> tuple[str, str]:
    from tools.data.make_demo_data import make_unlabeled_ct_pool

    datalist = make_unlabeled_ct_pool(str(root), n_train=n_train, n_val=2, n_test=0, shape=(96, 96, 64),
                                      spacing=(0.8, 0.8, 1.5))
    return str(root), datalist


def _build(data, store, log=None, **kwargs):
    from tools.data.preprocess_pool import preprocess_pool

    lines = [] if log is None else log
    return preprocess_pool(BUNDLE, str(store), data[0], data[1], workers=1, overrides=OVERRIDES,
                           log=lines.append, **kwargs)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    data = _pool(root / "data")
    log: list = []
    manifest = _build(data, root / "store", log)
    return data, str(root / "store"), manifest, log


def _bundle_transforms():
    """The bundle's own deterministic transforms and its random crop, parsed from its train.json."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    parser.update({"bundle_root": BUNDLE, "roi_size": ROI, "samples_per_volume": 3})
    return Compose(parser.get_parsed_content("train#deterministic_transforms")), parser.get_parsed_content(
        "train#random_transforms#0")


def test_store_crops_equal_the_bundle_pipeline_crops_voxel_for_voxel(store):
    from hybridmim_components.workflow import PoolRandCropSamplesd, pool_store_entries

    (dataset_dir, datalist), store_dir, manifest, _ = store
    deterministic, bundle_crop = _bundle_transforms()
    assert type(bundle_crop).__name__ == "RandSpatialCropSamplesd"
    store_crop = PoolRandCropSamplesd(keys="image", roi_size=ROI, num_samples=3)
    entries = pool_store_entries(store_dir, roi_size=ROI)
    with open(datalist) as f:
        sources = [os.path.join(dataset_dir, e["image"]) for e in json.load(f)["training"]]
    assert [e["pool_source"] for e in entries] == sources
    corners = set()
    for seed, (entry, record, source) in enumerate(zip(entries, manifest["volumes"], sources)):
        expected_volume = deterministic({"image": source})["image"]
        # the stored volume and its record are the bundle's preprocessing output
        stored = np.load(entry["image"])
        np.testing.assert_array_equal(stored, expected_volume.numpy())
        assert record["shape"] == list(expected_volume.shape)
        np.testing.assert_allclose(record["affine"], expected_volume.affine.numpy(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(record["spacing"], [1.5, 1.5, 2.0])
        # the same generator state: the same crops, voxel for voxel, same affine
        bundle_crop.set_random_state(seed=seed)
        store_crop.set_random_state(seed=seed)
        want = bundle_crop({"image": expected_volume})
        got = store_crop(entry)
        assert len(got) == len(want) == 3
        for w, g in zip(want, got):
            assert g["image"].shape == w["image"].shape == (1, *ROI) and g["image"].dtype == torch.float32
            assert torch.equal(g["image"].as_tensor(), w["image"].as_tensor())
            np.testing.assert_allclose(g["image"].affine.numpy(), w["image"].affine.numpy(), rtol=0, atol=1e-9)
            assert set(g) == {"image"}, "the pool_* keys are consumed"
            corners.add(tuple(g["image"].affine[:3, 3].tolist()))
    assert len(corners) > 3, "crops should land at different places"


def test_store_validation_crops_equal_the_bundle_validation_pipeline(store):
    """The validation list is stored too (a run from the store alone validates on it): loaded from the store and
    center-cropped, it equals the bundle's own validation preprocessing of the NIfTI, voxel for voxel."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from hybridmim_components.workflow import PoolLoadd, pool_store_entries

    (dataset_dir, datalist), store_dir, manifest, _ = store
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    parser.update({"bundle_root": BUNDLE, "roi_size": ROI})
    deterministic = Compose(parser.get_parsed_content("train#deterministic_transforms"))
    center = parser.get_parsed_content("validate#random_transforms#0")
    assert type(center).__name__ == "CenterSpatialCropd"
    with open(datalist) as f:
        sources = [os.path.join(dataset_dir, e["image"]) for e in json.load(f)["validation"]]
    entries = pool_store_entries(store_dir, roi_size=ROI, section="validation")
    assert [e["pool_source"] for e in entries] == sources and len(manifest["validation"]) == 2
    for entry, source in zip(entries, sources):
        want = center(deterministic({"image": source}))["image"]
        got = center(PoolLoadd(keys="image")(entry))["image"]
        assert got.shape == want.shape == (1, *ROI)
        assert torch.equal(got.as_tensor(), want.as_tensor())
        np.testing.assert_allclose(got.affine.numpy(), want.affine.numpy(), rtol=0, atol=1e-9)


def test_the_run_identity_of_a_store_is_its_content_not_its_paths(store, tmp_path):
    """A run from the store has no datalist to fingerprint: its data identity comes from the manifest (each stored
    volume's source SHA-256 and transforms), so the same pool stored from another folder, or a moved store, is the
    same data, and a changed volume is not."""
    import shutil

    import nibabel as nib

    from hybridmim_components.workflow import pool_store_identity

    (dataset_dir, datalist), store_dir, _, _ = store
    here = pool_store_identity(store_dir)
    assert len(here) == 64 and int(here, 16) >= 0
    moved = str(tmp_path / "moved_store")
    shutil.copytree(store_dir, moved)
    assert pool_store_identity(moved) == here
    copy = str(tmp_path / "elsewhere")
    shutil.copytree(dataset_dir, copy)
    copied = (copy, os.path.join(copy, os.path.relpath(datalist, dataset_dir)))
    _build(copied, tmp_path / "store_of_copy")
    assert pool_store_identity(str(tmp_path / "store_of_copy")) == here
    # one training volume of the copy changes: another pool
    with open(datalist) as f:
        first = os.path.join(copy, json.load(f)["training"][0]["image"])
    img = nib.load(first)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine, img.header), first)
    _build(copied, tmp_path / "store_of_copy")
    assert pool_store_identity(str(tmp_path / "store_of_copy")) != here


def test_a_rerun_skips_finished_volumes(store, tmp_path):
    data, store_dir, manifest, _ = store
    before = {r["id"]: os.stat(os.path.join(store_dir, r["file"])).st_mtime_ns for r in manifest["volumes"]}
    log: list = []
    again = _build(data, store_dir, log)
    assert "3 already in the store, 0 to preprocess" in log[0]
    after = {r["id"]: os.stat(os.path.join(store_dir, r["file"])).st_mtime_ns for r in again["volumes"]}
    assert after == before and len(before) == 3


def test_other_transforms_redo_the_store(tmp_path):
    """A different crop size (an override of the bundle config) changes the transforms: nothing is skipped."""
    data = _pool(tmp_path / "data", n_train=1)
    _build(data, tmp_path / "store")
    log: list = []
    from tools.data.preprocess_pool import preprocess_pool

    manifest = preprocess_pool(BUNDLE, str(tmp_path / "store"), data[0], data[1], workers=1,
                               overrides={"roi_size": [64, 64, 64]}, log=log.append)
    assert "0 already in the store, 1 to preprocess" in log[0]
    assert all(s >= 64 for s in manifest["volumes"][0]["shape"][1:])
    assert manifest["transforms"][-2]["spatial_size"] == [64, 64, 64]  # SpatialPadd, its @roi_size resolved


def test_a_corrupt_file_is_named_and_skipped_and_the_rest_stored(tmp_path, capsys):
    from tools.data.preprocess_pool import main

    dataset_dir, datalist = _pool(tmp_path / "data")
    with open(datalist) as f:
        content = json.load(f)
    bad = os.path.join(dataset_dir, content["training"][1]["image"])
    with open(bad, "rb") as f:
        raw = f.read()
    with open(bad, "wb") as f:
        f.write(raw[: len(raw) // 3])  # a truncated download
    content["training"].append({"image": "imagesTr/absent.nii.gz"})
    with open(datalist, "w") as f:
        json.dump(content, f)
    store_dir = str(tmp_path / "store")
    code = main([BUNDLE, store_dir, "--dataset_dir", dataset_dir, "--data_list_file_path", datalist,
                 "--workers", "1", "--set", "roi_size=[32,32,32]"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"skipped {bad}:" in out and "absent.nii.gz" in out
    with open(os.path.join(store_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert len(manifest["volumes"]) == 2
    assert sorted(os.path.basename(f["source"]) for f in manifest["failed"]) == ["absent.nii.gz", "pool_001.nii.gz"]
    assert bad not in [v["source"] for v in manifest["volumes"]]


def test_a_changed_source_is_redone_and_a_touched_one_kept(tmp_path):
    import nibabel as nib

    data = _pool(tmp_path / "data")
    store_dir = tmp_path / "store"
    first = _build(data, store_dir)
    changed, touched = first["volumes"][0], first["volumes"][2]
    img = nib.load(changed["source"])
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine, img.header), changed["source"])
    os.utime(touched["source"], ns=(1, 1))  # new mtime, same bytes
    log: list = []
    second = _build(data, store_dir, log)
    assert "2 already in the store, 1 to preprocess" in log[0]
    by_id = {r["id"]: r for r in second["volumes"]}
    assert by_id[changed["id"]]["sha256"] != changed["sha256"]
    assert by_id[touched["id"]]["sha256"] == touched["sha256"] and by_id[touched["id"]]["stat"][0][1] == 1
    np.testing.assert_array_equal(np.load(os.path.join(store_dir, by_id[changed["id"]]["file"])),
                                  _bundle_transforms()[0]({"image": changed["source"]})["image"].numpy())


def test_a_volume_smaller_than_the_crop_is_refused_by_name(store):
    from hybridmim_components.workflow import pool_store_entries

    _, store_dir, manifest, _ = store
    with pytest.raises(ValueError, match=r"smaller than roi_size \[96, 96, 96\].*--roi_size"):
        pool_store_entries(store_dir, roi_size=[96, 96, 96])
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        pool_store_entries(os.path.dirname(store_dir))


def test_the_store_check_names_a_truncated_volume_and_an_older_store(store, tmp_path, caplog):
    """The check a run from the store makes instead of the datalist scan: a truncated copy of a volume is named
    (check_data true reads each .npy header and size), a store without its validation list says how to add it."""
    import shutil

    from hybridmim_components.workflow import check_pool_store, pool_store_entries

    _, store_dir, manifest, _ = store
    copy = str(tmp_path / "store")
    shutil.copytree(store_dir, copy)
    with caplog.at_level("INFO"):
        assert check_pool_store(copy, ROI, image_channels=1) == {"training": 3, "validation": 2}
    assert "3 training and 2 validation volumes" in caplog.text
    with pytest.raises(ValueError, match=r"1 channel\(s\), this bundle's network takes 4"):
        check_pool_store(copy, ROI, image_channels=4)
    victim = os.path.join(copy, manifest["volumes"][1]["file"])
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)  # a copy cut short
    with pytest.raises(ValueError, match=rf"'{victim}': \d+ bytes, expected \d+ \(truncated copy\?\)"):
        check_pool_store(copy, ROI, image_channels=1)
    assert check_pool_store(copy, ROI, image_channels=1, enabled="false")["training"] == 3  # the CLI's string

    with open(os.path.join(copy, "manifest.json")) as f:
        older = json.load(f)
    del older["validation"]
    with open(os.path.join(copy, "manifest.json"), "w") as f:
        json.dump(older, f)
    with pytest.raises(ValueError, match=r"no validation volumes \(built by an older preprocess_pool.py\); rerun "
                                         r"`python tools/data/preprocess_pool.py"):
        pool_store_entries(copy, section="validation")


def _shard_worker(rank: int, world: int, store_dir: str, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from hybridmim_components.workflow import pool_store_entries

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        entries = pool_store_entries(store_dir, roi_size=ROI, seed=3)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump([e["image"] for e in entries], f)
    finally:
        # no collective ran: without this one, a rank could leave while the other is still connecting to it
        # (gloo: "connectFullMesh failed ... Connection closed by peer", seen once in a loaded CI dry run)
        dist.barrier()
        dist.destroy_process_group()


def test_ddp_ranks_read_disjoint_shards_covering_the_store(tmp_path):
    data = _pool(tmp_path / "data", n_train=4)
    store_dir = str(tmp_path / "store")
    _build(data, store_dir)
    torch.multiprocessing.spawn(_shard_worker, args=(2, store_dir, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    shards = [json.load(open(tmp_path / f"{r}.json")) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2
    assert not set(shards[0]) & set(shards[1])
    from hybridmim_components.workflow import pool_store_entries

    assert set(shards[0]) | set(shards[1]) == {e["image"] for e in pool_store_entries(store_dir, shard=False)}


# --- through the CLI -------------------------------------------------------------------------------------------------
TRAIN_TINY = ["--features", "[4,4,8,8,16,4]", "--roi_size", "[32,32,32]", "--region_size", "[32,32,32]",
              "--steps_per_epoch", "2", "--train#trainer#max_epochs", "1", "--train#dataloader#num_workers", "0",
              "--validate#dataloader#num_workers", "0", "--batch_size", "1", "--samples_per_volume", "2",
              "--val_interval", "1", "--amp", "false"]


def _bundle_cli(configs: list[str], data, store_dir: str, root, torchrun: bool = False) -> str:
    config = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                f"--master_port={_free_port()}"] if torchrun else [sys.executable]
    args = [*launcher, "-m", "monai.bundle", "run", "--config_file", config, "--bundle_root", BUNDLE,
            "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
            "--dataset_dir", data[0], "--data_list_file_path", data[1], "--pool_store_dir", store_dir,
            "--ckpt_dir", str(root / "models"), "--output_dir", str(root / "eval"), *TRAIN_TINY]
    proc = subprocess.run(args, cwd=BUNDLE, env=_env(), capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"training from the store failed (exit {proc.returncode}):\n{output[-6000:]}"
    return output


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _move_raw_data_away(data, root) -> None:
    """Only the store is left (as on a machine that got the store alone): the NIfTI folder, datalist included, moves
    where nothing looks; the command still names the old dataset_dir and datalist."""
    os.rename(data[0], str(root / "raw_moved_away"))
    assert not os.path.exists(data[1])


@pytest.mark.slow
def test_a_pretraining_bundle_trains_from_the_store_through_the_cli(tmp_path):
    """Old code: the datalist check, the validation list, the provenance pool size and the run identity read the
    NIfTI datalist, so a run with only the store stopped before training."""
    data = _pool(tmp_path / "data", n_train=2)
    store_dir = str(tmp_path / "store")
    manifest = _build(data, store_dir)
    _move_raw_data_away(data, tmp_path)
    log = _bundle_cli(["train.json", "pool_store.json"], data, store_dir, tmp_path)
    assert "train_reconstruction:" in log and "val_recon_mse" in log
    assert "2 training and 2 validation volumes" in log, "the store is checked at start"
    state = torch.load(str(tmp_path / "models" / "checkpoint_final.pt"), map_location="cpu", weights_only=True)
    assert int(state["trainer"]["iteration"]) == 2
    with open(tmp_path / "models" / "model.provenance.json") as f:
        assert json.load(f)["pool_size"] == len(manifest["volumes"]) == 2
    # the checkpoint's data identity is the store's (its content): a resume elsewhere recognises the run
    from hybridmim_components.workflow import pool_store_identity

    assert json.loads(state["run_identity"]["settings"]["data"]) == pool_store_identity(store_dir)


@pytest.mark.slow
def test_a_pretraining_bundle_trains_from_the_store_under_two_process_ddp(tmp_path):
    data = _pool(tmp_path / "data", n_train=2)
    store_dir = str(tmp_path / "store")
    _build(data, store_dir)
    _move_raw_data_away(data, tmp_path)
    log = _bundle_cli(["train.json", "multi_gpu_train.json", "pool_store.json"], data, store_dir, tmp_path,
                      torchrun=True)
    assert log.count("Metrics -- ") == 1, "validation metrics are logged by rank 0 only"
    state = torch.load(str(tmp_path / "models" / "checkpoint_final.pt"), map_location="cpu", weights_only=True)
    assert int(state["trainer"]["iteration"]) == 2


def test_the_store_must_come_after_multi_gpu_train(store):
    """Listed before multi_gpu_train.json, the NIfTI datalist would feed the store's crop: a clear error."""
    from hybridmim_components.workflow import PoolRandCropSamplesd

    with pytest.raises(ValueError, match="pool_store.json must be listed after"):
        PoolRandCropSamplesd(keys="image", roi_size=ROI)({"image": "/data/ct.nii.gz"})


def test_the_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "benchmarks", "benchmark_pool_store.py"),
         "--n_small", "2", "--n_large", "3", "--shape", "96,96,64", "--roi", "32", "--crops", "4", "--workers", "1",
         "--workdir", str(tmp_path / "work"), "--json", str(out), "--markdown", str(tmp_path / "bench.md")],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    result = json.loads(out.read_text())
    names = {c["name"] for c in result["candidates"]}
    assert {"nifti_on_the_fly", "persistent_dataset", "npy_memmap"} <= names
    for c in result["candidates"]:
        assert c["crops_per_s"] > 0 and c["bytes_per_ct"] > 0
    assert result["rss_mb"]["small"]["volumes"] == 2 and result["rss_mb"]["large"]["volumes"] == 3
    assert not (tmp_path / "work").exists(), "the simulated pool is deleted afterwards"
