"""A shared bundle travels: trained here, packed, downloaded and run where only the released package is installed.

A tiny SwinUNETR spleen finetune is trained through its ``train.json`` (MONAI CLI) with ``--downsample
merging_legacy``, the order every public SwinUNETR checkpoint was trained with. Then:

1. In the trained folder, the default ``inference.json``, ``evaluate.json`` and ``onnx_export`` of a user who
   remembered the width but not the merging order stop before computing anything, naming ``downsample``, both values
   and the override (before ``hybridmim_components.weights.trained_settings`` they ran and computed other features).
2. The folder is packed (``tools/bundles/pack_bundle.py``) and the zip downloaded with ``python -m monai.bundle
   download --url file://...`` into a folder outside the checkout, by a Python whose only install of this project is
   the wheel built from it (``pip wheel``, not editable): a fresh venv, with the wheel installed into it and the
   dependencies (torch, MONAI, ...) of the test environment visible through a ``.pth`` line, so that no checkout and no
   editable finder can be imported (asserted). There the default commands, with only the data's location and the
   runtime (``amp``, loader workers) given, run: ``inference.json`` writes the label maps the trained network computes
   (equal to a run in the trained folder with the right overrides), ``evaluate.json`` scores it, ``onnx_export`` and
   ``inference_onnx.json`` agree with PyTorch.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "hybridmim_swin_msd_spleen"
SOURCE = os.path.join(REPO_ROOT, "bundles", NAME)
WIDTH, ROI = 12, [64, 64, 64]
# not trained settings: how this machine runs them (inference.json; evaluate.json is layered on train.json)
RUNTIME = {"amp": False, "dataloader#num_workers": 0}
EVAL_RUNTIME = {"amp": False, "train#dataloader#num_workers": 0}


def env(python_path: str | None = REPO_ROOT) -> dict:
    """The wheel venv's clean environment; with ``python_path``, the checkout importable (the training side)."""
    from wheel_env import clean_env

    return {**clean_env(), "PYTHONPATH": python_path} if python_path else clean_env()


def run(args: list[str], cwd: str, python_path: str | None = REPO_ROOT, timeout: int = 900):
    return subprocess.run(args, cwd=cwd, env=env(python_path), capture_output=True, text=True, timeout=timeout)


def ok(proc, what: str) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{text[-6000:]}"
    return text


def cli(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return args


def data_overrides(datalist: str) -> dict:
    return {"dataset_dir": os.path.dirname(datalist), "data_list_file_path": os.path.basename(datalist)}


def configs(root: str, *names: str) -> str:
    files = [os.path.join(root, "configs", n) for n in names]
    return files[0] if len(files) == 1 else json.dumps(files)


def label_maps(folder: str) -> dict[str, np.ndarray]:
    found = sorted(glob.glob(os.path.join(folder, "**", "*_seg.nii.gz"), recursive=True))
    assert found, f"no label maps under {folder}"
    return {os.path.basename(p): np.asarray(nib.load(p).dataobj) for p in found}


# ---------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(trained bundle folder, datalist)``: one epoch of the tiny Swin spleen finetune with merging_legacy."""
    from tools.data.make_demo_data import make_ct_dataset

    work = tmp_path_factory.mktemp("shared")
    datalist = make_ct_dataset(str(work / "data"), num_classes=2, n_train=1, n_val=1, n_test=1)
    root = str(work / "trained" / NAME)
    shutil.copytree(SOURCE, root, ignore=shutil.ignore_patterns("*.pt", "eval"))
    overrides = {"bundle_root": root, **data_overrides(datalist), "feature_size": WIDTH, "downsample": "merging_legacy",
                 "roi_size": ROI, "amp": False, "use_checkpoint": False, "pretrained_path": "", "num_samples": 1,
                 "cache_rate": 0, "train#dataloader#num_workers": 0, "val_interval": 1, "train#trainer#max_epochs": 1}
    ok(run([sys.executable, "-m", "monai.bundle", "run", "--config_file", configs(root, "train.json"),
            *cli(overrides)], REPO_ROOT), "tiny Swin finetune with merging_legacy")
    assert os.path.isfile(os.path.join(root, "models", "model.provenance.json"))
    return root, datalist


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory):
    """A Python whose only install of this project is its wheel (``tests/wheel_env.py``)."""
    from wheel_env import wheel_python as make

    work = tmp_path_factory.mktemp("wheel")
    return make(str(work)), work


# ------------------------------------------------------------------------------------------------------------- tests
def test_default_commands_of_the_trained_folder_stop_on_the_forgotten_merging_order(trained, tmp_path):
    root, datalist = trained
    remembered = {"bundle_root": root, **data_overrides(datalist), "feature_size": WIDTH, "roi_size": ROI,
                  "output_dir": str(tmp_path / "out")}
    expected = "downsample: trained with 'merging_legacy', this config has 'merging'"
    commands = {
        "inference.json": ["run", "--config_file", configs(root, "inference.json"), *cli({**remembered, **RUNTIME})],
        "evaluate.json": ["run", "--config_file", configs(root, "train.json", "evaluate.json"),
                          *cli({**remembered, **EVAL_RUNTIME})],
        "onnx_export": ["onnx_export", "network_def", "--filepath", str(tmp_path / "model.onnx"), "--ckpt_file",
                        os.path.join(root, "models", "model.pt"), "--config_file", configs(root, "inference.json"),
                        "--input_shape", "[2, 1, 64, 64, 64]", *cli({"bundle_root": root, "feature_size": WIDTH})],
    }
    for what, args in commands.items():
        proc = run([sys.executable, "-m", "monai.bundle", *args], REPO_ROOT)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0 and expected in text and "--downsample merging_legacy" in text, (what, text[-3000:])
        assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "model.onnx"), what


def test_a_packed_bundle_runs_from_the_wheel_outside_the_checkout(trained, wheel_python, tmp_path):
    root, datalist = trained
    python, _ = wheel_python
    outside = str(tmp_path / "elsewhere")
    os.makedirs(outside)

    # the reference: the trained folder, run here with the overrides its trainer used
    reference = str(tmp_path / "reference")
    ok(run([sys.executable, "-m", "monai.bundle", "run", "--config_file", configs(root, "inference.json"),
            *cli({"bundle_root": root, **data_overrides(datalist), "feature_size": WIDTH,
                  "downsample": "merging_legacy", "roi_size": ROI, "output_dir": reference, **RUNTIME})], REPO_ROOT),
       "reference inference")

    zip_path = str(tmp_path / "dist" / f"{NAME}_v0.2.1.zip")
    packed = ok(run([sys.executable, os.path.join(REPO_ROOT, "tools", "bundles", "pack_bundle.py"), root,
                     "--output", zip_path, "--version", "0.2.1"], REPO_ROOT), "pack")
    assert "downsample: 'merging' -> 'merging_legacy'" in packed and "feature_size: 48 -> 12" in packed, packed

    # the recipient: another folder, the wheel, MONAI's own download
    ok(run([python, "-m", "monai.bundle", "download", "--name", NAME, "--url", "file://" + zip_path,
            "--bundle_dir", outside, "--progress", "False"], outside, None), "download")
    bundle = os.path.join(outside, NAME)
    data = data_overrides(datalist)

    out = os.path.join(bundle, "eval")
    text = ok(run([python, "-m", "monai.bundle", "run", "--config_file", configs(bundle, "inference.json"),
                   *cli({"bundle_root": bundle, **data, **RUNTIME})], outside, None), "inference.json")
    assert "match the ones the weights were trained with" in text, text[-3000:]
    got, want = label_maps(out), label_maps(reference)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)

    scores = os.path.join(outside, "scores")
    ok(run([python, "-m", "monai.bundle", "run", "--config_file", configs(bundle, "train.json", "evaluate.json"),
            *cli({"bundle_root": bundle, **data, "output_dir": scores, **EVAL_RUNTIME})], outside, None),
       "evaluate.json")
    assert os.path.isfile(os.path.join(scores, "val_mean_dice_raw.csv")) or glob.glob(os.path.join(scores, "*dice*"))

    onnx = ok(run([python, "-m", "monai.bundle", "onnx_export", "network_def", "--filepath", "models/model.onnx",
                   "--ckpt_file", "models/model.pt", "--meta_file", "configs/metadata.json", "--config_file",
                   "configs/inference.json", "--input_shape", "[2, 1, 64, 64, 64]", "--converter_kwargs",
                   "{'input_names': ['image'], 'output_names': ['pred'], "
                   "'dynamic_axes': {'image': {0: 'batch'}, 'pred': {0: 'batch'}}}"], bundle, None), "onnx_export")
    assert os.path.isfile(os.path.join(bundle, "models", "model.onnx")), onnx[-3000:]
    onnx_out = os.path.join(outside, "onnx")
    ok(run([python, "-m", "monai.bundle", "run", "--config_file",
            configs(bundle, "inference.json", "inference_onnx.json"),
            *cli({"bundle_root": bundle, **data, "output_dir": onnx_out, "dataloader#num_workers": 0})], outside,
           None), "inference_onnx.json")
    onnx_maps = label_maps(onnx_out)
    for key, labels in want.items():
        agreement = float(np.mean(onnx_maps[key] == labels))
        assert agreement >= 0.99, (key, agreement)
