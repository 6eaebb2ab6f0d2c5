"""Sharing pretrained weights as a bundle: pack (tools/bundles/pack_bundle.py) -> download (MONAI CLI) -> finetune.

A tiny pretraining backbone is saved as ``models/model.pt`` into a copy of ``bundles/hybridmim_unet_pretrain`` (with
the files a training run leaves next to it: full checkpoints, the whole pretraining network, TensorBoard logs), packed,
downloaded with ``python -m monai.bundle download --url file://...`` as a user would, and finetuned from: in process
with ``load_pretrained_weights`` and (slow) through the finetune bundle's CLI.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
import yaml
from monai.networks.nets import BasicUNet

from hybridmim_components import HybridMIMUNet, load_pretrained_weights
from hybridmim_components.weights.transfer import WeightsHashError
from tools.bundles.pack_bundle import main as pack_main
from tools.bundles.pack_bundle import pack_bundle

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "hybridmim_unet_pretrain"
SOURCE_BUNDLE = os.path.join(REPO_ROOT, "bundles", NAME)
FEATURES = [4, 4, 8, 8, 16, 4]
with open(os.path.join(SOURCE_BUNDLE, "configs", "metadata.json")) as _f:
    SOURCE_VERSION = json.load(_f)["version"]  # the generated bundle's version (the package release's)
_MAJOR, _MINOR, _PATCH = (int(p) for p in SOURCE_VERSION.split("."))
NEXT_PATCH, NEXT_MINOR = f"{_MAJOR}.{_MINOR}.{_PATCH + 1}", f"{_MAJOR}.{_MINOR + 1}.0"  # what a user's re-pack names


def sha256_of(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    e.pop("BUNDLE_DOWNLOAD_SRC", None)  # `--url` must work whatever the user's default source is
    return e


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def assert_ok(proc: subprocess.CompletedProcess, what: str) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{text[-6000:]}"
    return text


@pytest.fixture
def trained_bundle(tmp_path):
    """A copy of the UNet pretraining bundle as a training run leaves it (tiny backbone in models/model.pt)."""
    root = tmp_path / "work" / NAME
    shutil.copytree(SOURCE_BUNDLE, root, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval", "runs"))
    torch.manual_seed(0)
    torch.save(HybridMIMUNet(features=FEATURES).backbone.state_dict(), root / "models" / "model.pt")
    # what else a run writes: none of it belongs in the shared bundle
    torch.save({"network": {"w": torch.zeros(1)}, "optimizer": {}}, root / "models" / "checkpoint_final.pt")
    torch.save({"network": {"w": torch.zeros(1)}}, root / "models" / "checkpoint_epoch=2.pt")
    torch.save({"w": torch.zeros(1)}, root / "models" / "pretrain_network.pt")
    (root / "eval").mkdir()
    (root / "eval" / "events.out.tfevents.1").write_bytes(b"log")
    (root / "configs" / "__pycache__").mkdir()
    (root / "configs" / "__pycache__" / "x.pyc").write_bytes(b"pyc")
    return root


def expected_members() -> set[str]:
    """The bundle's own files (configs, docs, LICENSE) plus the weights and their large_files.yml."""
    names = {"LICENSE", "models/model.pt", "large_files.yml"}
    for sub in ("configs", "docs"):
        names |= {f"{sub}/{f}" for f in os.listdir(os.path.join(SOURCE_BUNDLE, sub))}
    return {f"{NAME}/{n}" for n in names}


def download(zip_path, bundle_dir) -> str:
    """``python -m monai.bundle download`` from a ``file://`` URL; returns the downloaded bundle folder."""
    url = "file://" + os.path.abspath(zip_path)
    assert_ok(
        run(sys.executable, "-m", "monai.bundle", "download", "--name", NAME, "--url", url,
            "--bundle_dir", str(bundle_dir), "--progress", "false"),
        "monai.bundle download",
    )
    return os.path.join(bundle_dir, NAME)


def finetune_unet(out_channels: int = 2) -> BasicUNet:
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=out_channels, features=FEATURES)


@pytest.fixture
def downloaded(trained_bundle, tmp_path):
    """Pack through the CLI and download through MONAI's CLI: ``(downloaded bundle folder, zip path)``."""
    zip_path = tmp_path / "dist" / f"{NAME}_v{SOURCE_VERSION}.zip"
    text = assert_ok(run(sys.executable, "tools/bundles/pack_bundle.py", str(trained_bundle), "--output", str(zip_path)),
                     "pack_bundle")
    assert str(zip_path) in text and "monai.bundle download" in text  # tells the user how to get it back
    return download(zip_path, tmp_path / "downloaded"), zip_path


# ------------------------------------------------------------------------------------------------------ round trip
def test_pack_download_finetune_round_trip(trained_bundle, downloaded):
    bundle, zip_path = downloaded
    with zipfile.ZipFile(zip_path) as zf:
        assert set(zf.namelist()) == expected_members()  # no checkpoints, pretrain_network.pt, eval/, caches

    packed = trained_bundle / "models" / "model.pt"
    weights = os.path.join(bundle, "models", "model.pt")
    assert open(weights, "rb").read() == packed.read_bytes()
    with open(os.path.join(bundle, "large_files.yml")) as f:
        manifest = yaml.safe_load(f)
    (entry,) = manifest["large_files"]
    assert entry["path"] == "models/model.pt" and entry["hash_type"] == "sha256"
    assert entry["hash_val"] == sha256_of(weights) == sha256_of(packed)
    assert entry["url"], "a url placeholder for the user to fill in"
    with open(os.path.join(bundle, "configs", "metadata.json")) as f, open(
        os.path.join(SOURCE_BUNDLE, "configs", "metadata.json")
    ) as g:
        assert json.load(f) == json.load(g)  # no --version: metadata unchanged

    # finetune from the downloaded bundle folder: all but the 2-class last layer loads, tensors as packed
    net = finetune_unet(out_channels=2)
    fresh_last = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("final_conv.")}
    report = load_pretrained_weights(net, bundle)
    assert report["path"] == weights and report["sha256"] == entry["hash_val"]
    assert report["missing"] == [] and [m.split()[0] for m in report["left_to_train"]] == [
        "final_conv.weight", "final_conv.bias"]
    source = torch.load(packed, weights_only=True)
    assert len(report["loaded"]) == len(source) - 2
    for name, value in net.state_dict().items():
        expected = fresh_last[name] if name.startswith("final_conv.") else source[name]
        assert torch.equal(value, expected), name

    # MONAI's own loader reads the downloaded bundle too (same out_channels, or it skips mis-shaped layers silently)
    from monai.bundle import load

    same = load(name=NAME, model=finetune_unet(out_channels=1), bundle_dir=os.path.dirname(bundle), device="cpu")
    assert all(torch.equal(v, source[k]) for k, v in same.state_dict().items())


def test_corrupted_weights_are_refused_naming_the_file_and_both_hashes(downloaded):
    bundle, _ = downloaded
    weights = os.path.join(bundle, "models", "model.pt")
    listed = sha256_of(weights)
    state = torch.load(weights, weights_only=True)
    state["conv_0.conv_0.conv.weight"] += 1.0  # a loadable file with other values: only the hash can tell
    torch.save(state, weights)
    actual = sha256_of(weights)
    net = finetune_unet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for path in (bundle, weights):  # the bundle folder, or its models/model.pt directly
        with pytest.raises(WeightsHashError) as err:
            load_pretrained_weights(net, path)
        message = str(err.value)
        assert weights in message and "large_files.yml" in message and listed in message and actual in message
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing loaded


# ------------------------------------------------------------------------------------------------------ pack options
def test_version_bump_adds_changelog_line_and_leaves_the_source_alone(trained_bundle, tmp_path):
    source_meta = (trained_bundle / "configs" / "metadata.json").read_text()
    out = pack_bundle(str(trained_bundle), version=NEXT_MINOR, changelog="pretrained on 10 CT volumes",
                      output=str(tmp_path / "b.zip"))
    assert out == str(tmp_path / "b.zip")
    with zipfile.ZipFile(out) as zf:
        meta = json.loads(zf.read(f"{NAME}/configs/metadata.json"))
    assert meta["version"] == NEXT_MINOR
    assert list(meta["changelog"].items())[0] == (NEXT_MINOR, "pretrained on 10 CT volumes")  # newest first
    assert meta["changelog"][SOURCE_VERSION] == json.loads(source_meta)["changelog"][SOURCE_VERSION]
    assert (trained_bundle / "configs" / "metadata.json").read_text() == source_meta


def test_default_output_is_named_after_bundle_and_version(trained_bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = pack_bundle(str(trained_bundle), version=NEXT_PATCH)
    assert os.path.abspath(out) == str(tmp_path / f"{NAME}_v{NEXT_PATCH}.zip")
    with zipfile.ZipFile(out) as zf:
        meta = json.loads(zf.read(f"{NAME}/configs/metadata.json"))
    assert meta["version"] == NEXT_PATCH and "sha256" in meta["changelog"][NEXT_PATCH]  # default changelog line


@pytest.mark.parametrize("version", [SOURCE_VERSION, "0.0.9", "v2", "1.2"])
def test_version_must_be_newer_semver(trained_bundle, tmp_path, version):
    with pytest.raises(ValueError, match=f"--version {version}.*{SOURCE_VERSION}"):
        pack_bundle(str(trained_bundle), version=version, output=str(tmp_path / "b.zip"))


def test_missing_weights_name_the_path_and_say_train_first(trained_bundle, tmp_path, capsys):
    os.remove(trained_bundle / "models" / "model.pt")
    assert pack_main([str(trained_bundle), "--output", str(tmp_path / "b.zip")]) != 0
    err = capsys.readouterr().err
    assert str(trained_bundle / "models" / "model.pt") in err and "train" in err
    assert not (tmp_path / "b.zip").exists()


def test_a_folder_that_is_not_a_bundle_is_refused(tmp_path, capsys):
    (tmp_path / "plain" / "models").mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain" / "models" / "model.pt")
    assert pack_main([str(tmp_path / "plain"), "--output", str(tmp_path / "b.zip")]) != 0
    err = capsys.readouterr().err
    assert os.path.join(str(tmp_path / "plain"), "configs", "metadata.json") in err and "not a bundle" in err


def test_a_full_training_checkpoint_as_model_pt_is_refused(trained_bundle, tmp_path):
    shutil.copy(trained_bundle / "models" / "checkpoint_final.pt", trained_bundle / "models" / "model.pt")
    with pytest.raises(ValueError, match="full training checkpoint.*optimizer"):
        pack_bundle(str(trained_bundle), output=str(tmp_path / "b.zip"))


def test_url_option_fills_the_large_files_url(trained_bundle, tmp_path):
    url = "https://example.org/weights/model.pt"
    out = pack_bundle(str(trained_bundle), output=str(tmp_path / "b.zip"), url=url)
    with zipfile.ZipFile(out) as zf:
        (entry,) = yaml.safe_load(zf.read(f"{NAME}/large_files.yml"))["large_files"]
    assert entry["url"] == url


# ---------------------------------------------------------------------------------------- finetune bundle CLI (slow)
@pytest.mark.slow
def test_finetune_bundle_cli_from_downloaded_bundle(downloaded, tmp_path):
    from tools.data.make_demo_data import make_ct_dataset

    bundle, _ = downloaded
    datalist = make_ct_dataset(str(tmp_path / "data"), num_classes=2)
    cfg = os.path.join(REPO_ROOT, "bundles", "hybridmim_unet_msd_spleen", "configs")
    overrides = {
        "bundle_root": str(tmp_path / "finetune"),
        "dataset_dir": os.path.dirname(datalist),
        "data_list_file_path": os.path.basename(datalist),
        "roi_size": [32, 32, 32],
        "amp": False,
        "features": FEATURES,
        "num_samples": 1,
        "cache_rate": 0,
        "train#dataloader#num_workers": 0,
        "val_interval": 1,
        "train#trainer#max_epochs": 1,
        "pretrained_path": bundle,
    }
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    text = assert_ok(
        run(sys.executable, "-m", "monai.bundle", "run", "--config_file", f"{cfg}/train.json", *args, timeout=600),
        "finetune train",
    )
    weights = os.path.join(bundle, "models", "model.pt")
    n_params = len(HybridMIMUNet(features=FEATURES).backbone.state_dict())
    assert f"pretrained weights {weights}:" in text
    assert f"loaded: {n_params - 2}" in text and "left_to_train: 2" in text and "unexpected: 0" in text
    assert f"sha256 {sha256_of(weights)}" in text, "the log must say the weights were verified"
    assert "Epoch[1] Complete" in text
