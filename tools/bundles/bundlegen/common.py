"""Pieces shared by every bundle of the collection: logging config, licence, metadata header.

Bundle families (``pretrain.py``, ``finetune.py``) return ``{bundle_name: {relative_path: content}}`` where content
is a ``dict``/``list`` (written as JSON, indent 4) or a ``str`` (written as is). ``tools/bundles/generate_bundles.py`` writes
them; ``tests/test_generate_bundles.py`` checks that the committed bundles match.
"""
from __future__ import annotations

import ast
import os

PACKAGE_NAME = "hybridmim-components"  # the distribution the bundles import (hybridmim_components)
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PACKAGE_INIT = os.path.join(_REPO_ROOT, "hybridmim_components", "__init__.py")


def package_version(init_path: str = PACKAGE_INIT) -> str:
    """``hybridmim_components.__version__``, read from its source as setuptools reads it (the generator imports
    neither the package nor torch)."""
    with open(init_path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=init_path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise ValueError(f"{init_path}: no `__version__ = \"X.Y.Z\"` assignment (the package's one version source).")


PACKAGE_VERSION = package_version()
# the bundles are released with the package: one version for both; every version needs a changelog line (newest first)
COLLECTION_VERSION = PACKAGE_VERSION
CHANGELOG = {
    "0.2.0": f"requires {PACKAGE_NAME} 0.2.0, named in required_packages_version (a released wheel; see its "
             "CHANGELOG.md)",
    "0.1.0": "first release of the HybridMIM bundle collection",
}
MONAI_VERSION = "1.6.1"
PYTORCH_VERSION = "2.13.0"
NUMPY_VERSION = "2.4.6"
# the model zoo's CI installs each entry as `pip install name==version`: bare versions, not specifiers
REQUIRED_PACKAGES = {PACKAGE_NAME: PACKAGE_VERSION, "nibabel": "5.4.2", "pytorch-ignite": "0.5.5", "itk": "5.4.7",
                     "tensorboard": "2.21.0"}
SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)

LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

LICENSE = """Copyright (c) HybridMIM Bundles contributors

Licensed under the Apache License, Version 2.0 (the "License");
you may not use this file except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.

The model weights produced with this bundle inherit the terms of the data they were trained on:
see docs/data_license.txt.
"""


DEVICE = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
# under torchrun each process drives the GPU of its local rank (LOCAL_RANK, not the global rank: multi-node safe)
DDP_DEVICE = "$torch.device('cuda:' + os.environ.get('LOCAL_RANK', '0') if torch.cuda.is_available() else 'cpu')"
DDP_NETWORK = {
    "_target_": "torch.nn.parallel.DistributedDataParallel",
    "module": "$@network_def.to(@device)",
    "device_ids": "$[@device] if torch.cuda.is_available() else None",
}
ADAMW = {
    "_target_": "torch.optim.AdamW",
    "params": "$@network.parameters()",
    "lr": "@learning_rate",
    "weight_decay": "@weight_decay",
}


def location_keys(dataset_dir: str) -> dict:
    """The first keys of every train/inference config: where the bundle, its outputs and its data are; the device.

    ``data_list_file_path`` is relative to ``dataset_dir`` (or absolute): ``tools/data/prepare_datalist.py`` writes it.
    """
    return {
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": dataset_dir,
        "data_list_file_path": "datalist.json",
        "device": DEVICE,
    }


def metadata_header(description: str, task: str) -> dict:
    """The metadata fields every bundle shares (schema, versions, authors); families add the rest."""
    return {
        "schema": SCHEMA_URL,
        "version": COLLECTION_VERSION,
        "changelog": dict(CHANGELOG),
        "monai_version": MONAI_VERSION,
        "pytorch_version": PYTORCH_VERSION,
        "numpy_version": NUMPY_VERSION,
        "required_packages_version": dict(REQUIRED_PACKAGES),
        "supported_apps": {},
        "task": task,
        "description": description,
        "authors": "HybridMIM Bundles contributors",
        "copyright": "Copyright (c) HybridMIM Bundles contributors",
    }


def common_files() -> dict:
    """Files identical in every bundle."""
    return {"configs/logging.conf": LOGGING_CONF, "LICENSE": LICENSE, "models/.gitkeep": ""}

# the package of the workflow glue: every name the bundles use is re-exported there
WORKFLOW = "hybridmim_components.workflow"
# MONAI's CheckpointSaver writing atomically (temp file + rename; an old checkpoint is deleted only after its
# successor is complete) and never saving a best model from a validation before any training step
SAVER = "hybridmim_components.workflow.CrashSafeCheckpointSaver"
# the random states of training (torch, numpy, python, the transforms' own generators; every rank under DDP) in the
# full checkpoint, so that a resumed run continues exactly as an uninterrupted one
RANDOM_STATES = {"_target_": "hybridmim_components.workflow.RandomStates", "trainer": "@train#trainer",
                 "transforms": "@train#preprocessing"}
# snapshot the random states at every epoch end on every rank, before the checkpoint saver writes them
ATTACH_RANDOM_STATES = "$@train#random_states.attach(@train#trainer)"

# what `--resume true` guarantees, the same sentence in every bundle README
RESUME_GUARANTEE = (
    "Checkpoints are written to a temporary file and renamed, and an old one is deleted only after its successor is "
    "complete, so a kill at any moment (SIGKILL, out of memory, a lost node) leaves a readable checkpoint. "
    "`--resume true` continues from the most advanced readable full checkpoint in `ckpt_dir` (by the iteration stored "
    "in it, not the file date; an unreadable one is named and skipped) with the network, optimiser, scheduler, AMP "
    "loss scale, best validation so far and every random state (torch, CUDA, numpy, Python, each random transform, "
    "each DDP rank): resumed from an epoch checkpoint with the same command, it ends with the same weights as an "
    "uninterrupted run (bit for bit on CPU, tested; on GPU the random draws are the same but non-deterministic CUDA "
    "kernels make the floats drift, as between two uninterrupted GPU runs). A larger `max_epochs` continues the "
    "cosine schedule to the new end (the rate is recomputed at the saved step, logged). A validation before any "
    "training step (`exec_at_start`) never becomes `model.pt`."
)

# end of a DDP run: every rank waits for the others (rank 0 may still be writing checkpoint_final.pt), then the
# process group is destroyed; a destroy without that barrier aborted gloo ranks at exit now and then
DDP_FINALIZE = ["$import hybridmim_components.utils.distributed",
                "$hybridmim_components.utils.distributed.shutdown_process_group()"]


# --- pretrained weights: keys shared by both families ---------------------------------------------------------------
# SwinUNETR patch-merging order: "merging" (MONAI >= 1.5), "merging_legacy" (MONAI <= 1.4, what public checkpoints
# were trained with), "mergingv2"
DOWNSAMPLE = "merging"
USE_V2 = False  # SwinUNETR-v2 (residual conv block per stage): true for VoCo weights
DOWNSAMPLE_REF = "$hybridmim_components.resolve_downsample(@downsample)"
PRETRAINED_KEYS = {
    # "all": everything but the last layer must load; "encoder": the encoder must load, the decoder starts fresh
    "pretrained_scope": "all",
    # fit the input layers of weights pretrained on another channel count (mean kernel repeated, scaled)
    "adapt_in_channels": False,
    # stop (instead of warning) when the weights' recorded preprocessing differs from this bundle's
    "strict_preprocessing": False,
}


def preprocessing_record(ct: bool) -> dict:
    """This bundle's preprocessing in the vocabulary of ``hybridmim_components.weights.provenance`` (config
    references)."""
    intensity = ({"kind": "window", "a_min": "@a_min", "a_max": "@a_max", "b_min": 0.0, "b_max": 1.0, "clip": True}
                 if ct else {"kind": "zscore", "nonzero": True, "channel_wise": True})
    return {"orientation": "RAS", "spacing": "@pixdim", "intensity": intensity, "crop": "@roi_size"}


def load_pretrained_call(network: str) -> str:
    """The `initialize` entry that loads `pretrained_path` into `network` and logs/raises its report."""
    return ("$hybridmim_components.load_pretrained_weights(" + network + ", @pretrained_path, "
            "scope=@pretrained_scope, adapt_in_channels=@adapt_in_channels, "
            "expected_preprocessing=@preprocessing_record, strict_preprocessing=@strict_preprocessing)")


def public_weights_section(swin: bool, pretraining: bool) -> str:
    """Bundle README paragraph on the keys that start a bundle from other weights (both families)."""
    target = "the backbone before pretraining continues (the heads start fresh)" if pretraining else "the network"
    text = f"""
### Starting from other weights

`pretrained_path` loads {target}; besides this collection's files it takes the public checkpoints that
`hybridmim_components.weights.public_weights` recognises from their keys (Tang et al.'s `model_swinvit.pt`, the
model zoo's `swin_unetr_btcv_segmentation`, VoCo, SuPreM, Disruptive Autoencoders, the HybridMIM authors' layout). The
log names the layout and the counts loaded / missing / unexpected / mis-shaped. The keys:

| key | default | meaning |
|---|---|---|
| `pretrained_scope` | `"all"` | `"all"`: everything but the last layer must load; `"encoder"`: the encoder must load (the decoder starts fresh, logged); a file that covers less stops, naming this key |
| `adapt_in_channels` | `false` | `true` fits the input layers of weights with C0 input channels to this bundle's C (mean kernel repeated C times, scaled by C0/C: equal input channels give the original activations) |
| `strict_preprocessing` | `false` | the weights' provenance record (`models/model.provenance.json`, or the published preprocessing of a public layout) is compared with `preprocessing_record`; each difference is a warning, `true` makes it stop |
"""
    if swin:
        text += """| `downsample` | `"merging"` | SwinUNETR patch merging: `"merging_legacy"` is MONAI's order before 1.5, which every public SwinUNETR checkpoint was trained with; weights whose recorded order differs stop the run, naming this key |
| `use_v2` | `false` | SwinUNETR-v2 (VoCo's weights) |
"""
    if pretraining:
        text += """
A run writes `models/model.provenance.json` beside `models/model.pt`: backbone, width, input channels, merging
order, spacing, orientation, intensity window, crop, pool size, steps, MONAI and torch versions. `pack_bundle.py`
packs it with the weights; the finetune bundles check it.
"""
    return text


def provenance_recorder(backbone: str, swin: bool, in_channels, source: str, pool_size=None,
                        steps_planned=None, out_channels=None) -> dict:
    """`train#provenance`: writes models/model.provenance.json whenever models/model.pt is saved (what the weights
    were trained with: preprocessing, backbone, merging order, versions; `hybridmim_components.weights.provenance`)."""
    return {
        "_target_": "hybridmim_components.weights.provenance.ProvenanceRecorder",
        "weights_path": "$@ckpt_dir + '/model.pt'",
        "record": {
            "_target_": "hybridmim_components.weights.provenance.make_record",
            "backbone": backbone,
            "width": "@feature_size" if swin else "@features",
            "in_channels": in_channels,
            "preprocessing": "@preprocessing_record",
            "downsample": "@downsample" if swin else None,
            "pool_size": pool_size,
            "steps_planned": steps_planned,
            "source": source,
            # what a finetune's weights also need to compute as trained (hybridmim_components.weights.trained_settings)
            **({"out_channels": out_channels} if out_channels is not None else {}),
            **({"use_v2": "@use_v2"} if swin else {}),
        },
    }


ATTACH_PROVENANCE = "$@train#provenance.attach(@train#trainer)"


# --- trained weights: the settings they were trained with (hybridmim_components.weights.trained_settings) ------------
# stop (instead of warning) when a config's network or preprocessing differs from the trained weights' record
CHECK_TRAINED_SETTINGS = True


def architecture_record(backbone: str, swin: bool, in_channels="@network_def#in_channels",
                        out_channels="@network_def#out_channels") -> dict:
    """This config's network in the record's fields (what ``check_trained_settings`` compares)."""
    record = {"backbone": backbone, "width": "@feature_size" if swin else "@features", "in_channels": in_channels}
    if out_channels is not None:
        record["out_channels"] = out_channels
    if swin:
        record.update({"downsample": "@downsample", "use_v2": "@use_v2"})
    return record


def trained_settings_check(weights: str = "$@ckpt_dir + '/model.pt'", architecture: str | None = "@architecture_record") -> str:
    """The expression that compares the config with the record beside ``weights`` before any network computes: the
    ``_requires_`` of ``network_def`` (so MONAI Label and ``onnx_export``, which parse ``network_def``, check too)."""
    path = weights[1:] if weights.startswith("$") else weights
    return (f"$hybridmim_components.check_trained_settings({path}, {architecture or 'None'}, @preprocessing_record, "
            "enabled=@check_trained_settings)")
