"""Public pretrained weights through the bundle CLI: warm-starting pretraining from every Swin layout, a BraTS
finetune from a CT pretraining (other channel count), and ``tools/weights/import_weights.py``.

The files are built with exactly the public key names and shapes (``tests/test_public_weights.py`` makes them from
MONAI's own classes, renamed by the published layouts) at a tiny width; the bundles run with tiny overrides on CPU.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from test_finetune_bundles import assert_ok, cli_args, configs, output_of, run_cli, train_overrides  # noqa: F401
from test_public_weights import (
    dae_file,
    only,
    projection_head,
    suprem_heads,
    swin_state,
    tang_swinvit_file,
)

from hybridmim_components.weights.provenance import make_record, read_provenance, window_intensity, write_provenance

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
WIDTH = 12
PRETRAIN_SMALL = {
    "feature_size": WIDTH, "roi_size": [64, 64, 64], "region_size": [32, 32, 32], "steps_per_epoch": 1,
    "train#trainer#max_epochs": 1, "train#dataloader#num_workers": 0, "validate#dataloader#num_workers": 0,
    "batch_size": 1, "samples_per_volume": 1, "val_interval": 100, "amp": False,
}


def _public_files() -> dict:
    """``{layout: (checkpoint object, extra overrides, the MONAI-named state it was made from)}`` for every Swin layout,
    feature size 12 (the model zoo's: 48), 1 channel."""
    full = swin_state(seed=1, feature_size=WIDTH)  # a SwinUNETR with out 2 (MONAI names)
    no_out = {k: v for k, v in full.items() if not k.startswith("out.")}
    v2 = swin_state(seed=2, feature_size=WIDTH, use_v2=True)
    encoder_v2 = only(v2, "swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10")
    voco = {"backbone." + k: v for k, v in encoder_v2.items()}
    voco.update(projection_head("student.", 16 * WIDTH))
    voco.update(projection_head("teacher.", 16 * WIDTH))
    zoo = swin_state(seed=3, feature_size=48, out_channels=14)  # recognised by its width 48 and 14 classes
    suprem = {"module.backbone." + k: v for k, v in no_out.items()}
    suprem.update({"module." + k: v for k, v in suprem_heads("", classes=4).items()})
    authors_source = swin_state(seed=4, feature_size=WIDTH, out_channels=1)
    authors = {"module." + k: v for k, v in authors_source.items()}
    authors["module.contrast_learning_head.weight"] = torch.zeros(8, 16 * WIDTH)
    dae_source = swin_state(seed=5, feature_size=WIDTH, out_channels=1)
    legacy = {"downsample": "merging_legacy"}
    return {
        "tang_ssl_swinvit": (tang_swinvit_file(full), dict(legacy, pretrained_scope="encoder"), full),
        "model_zoo_swin_unetr_btcv": (zoo, dict(legacy, feature_size=48), zoo),
        "voco": (voco, dict(legacy, pretrained_scope="encoder", use_v2=True), v2),
        "suprem_swin": ({"net": suprem}, legacy, full),
        "dae_swin": (dae_file(dae_source), legacy, dae_source),
        "hybridmim_authors": ({"state_dict": authors}, legacy, authors_source),
    }


#: the layout that pretraining warm-starts from through the CLI, trains and resumes; every layout (this one too) is
#: loaded in process by the bundle's own ``initialize`` (a CLI start costs ~10 s of imports, a tiny Swin step more)
CLI_LAYOUT = "tang_ssl_swinvit"
LAYOUTS = list(_public_files())


@pytest.fixture(scope="module")
def ct_pool(tmp_path_factory):
    from tools.data.make_demo_data import make_unlabeled_ct_pool

    return make_unlabeled_ct_pool(str(tmp_path_factory.mktemp("pool")), n_train=1, n_val=1, n_test=1)


def _pretrain_overrides(layout: str, ct_pool: str, tmp_path) -> dict:
    """The tiny pretraining's overrides with ``layout``'s file written under ``tmp_path`` as ``pretrained_path``."""
    checkpoint, extra, _ = _public_files()[layout]
    path = tmp_path / f"{layout}.pt"
    torch.save(checkpoint, path)
    overrides = dict(PRETRAIN_SMALL, bundle_root=str(tmp_path / "bundle"), dataset_dir=os.path.dirname(ct_pool),
                     data_list_file_path=os.path.basename(ct_pool), pretrained_path=str(path))
    overrides.update(extra)
    return overrides


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_pretraining_bundle_loads_each_public_swin_layout(layout, ct_pool, tmp_path):
    """The bundle's ``initialize`` (in process: the expressions the CLI runs) leaves the file's weights in the network:
    a tensor of the first Swin stage equals the one the file was made from, after the layout's renaming."""
    from monai.bundle import ConfigWorkflow

    overrides = _pretrain_overrides(layout, ct_pool, tmp_path)
    bundle = os.path.join(BUNDLES_DIR, "hybridmim_swin_pretrain")
    workflow = ConfigWorkflow(config_file=f"{bundle}/configs/train.json", workflow_type="train", logging_file=False,
                              **overrides)
    workflow.initialize()
    backbone = workflow.parser.get_parsed_content("network_def").backbone.state_dict()
    source = _public_files()[layout][2]
    key = "swinViT.layers1.0.blocks.0.attn.qkv.weight"  # same name in MONAI's v1 and v2 SwinUNETR
    assert torch.equal(backbone[key], source[key]), f"{layout}: {key} is not the file's"
    fresh = swin_state(seed=0, feature_size=overrides["feature_size"], use_v2=overrides.get("use_v2", False))
    assert not torch.equal(backbone[key], fresh[key])  # the comparison can fail: another seed differs


@pytest.mark.slow
def test_pretraining_warm_starts_from_a_public_layout_through_the_cli(ct_pool, tmp_path):
    overrides = _pretrain_overrides(CLI_LAYOUT, ct_pool, tmp_path)
    path = overrides["pretrained_path"]
    bundle = os.path.join(BUNDLES_DIR, "hybridmim_swin_pretrain")
    text = assert_ok(run_cli("run", "--config_file", f"{bundle}/configs/train.json", *cli_args(overrides)), CLI_LAYOUT)
    report = re.search(re.escape(f"pretrained weights {path}:") + r"\n\s*layout: [^\n]*\n\s*loaded: (\d+)", text)
    assert report and int(report.group(1)) > 0, text[-3000:]
    assert "pretrained_scope 'encoder'" in text and "starts from random weights" in text
    record = read_provenance(tmp_path / "bundle" / "models" / "model.pt")
    assert record["downsample"] == "merging_legacy" and record["source"] == "hybridmim_swin_pretrain"
    # a warm-started run resumes from its own checkpoint, not from the file again
    overrides.update({"resume": True, "train#trainer#max_epochs": 2})
    text = assert_ok(run_cli("run", "--config_file", f"{bundle}/configs/train.json", *cli_args(overrides)), "resume")
    assert "resuming from full checkpoint" in text and "(iteration 1)" in text


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    from tools.data.make_demo_data import make_brats_dataset

    return make_brats_dataset(str(tmp_path_factory.mktemp("brats")))


@pytest.mark.slow
def test_brats_finetune_starts_from_a_ct_pretraining(brats, tmp_path):
    import hybridmim_components as hc

    torch.manual_seed(0)
    features = [4, 4, 8, 8, 16, 4]
    ct_backbone = hc.HybridMIMUNet(in_channels=1, features=features).backbone  # what the CT pretraining saves
    weights = tmp_path / "ct_pretrain" / "models" / "model.pt"
    weights.parent.mkdir(parents=True)
    torch.save(ct_backbone.state_dict(), weights)
    ct = {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "intensity": window_intensity(-1000, 1000),
          "crop": [96, 96, 96]}
    write_provenance(weights, make_record("BasicUNet", features, 1, ct, source="hybridmim_unet_pretrain"))
    overrides = dict(train_overrides("unet", "brats", str(tmp_path / "run"), brats), pretrained_path=str(weights))
    cfg = configs("unet", "brats")
    proc = run_cli("run", "--config_file", f"{cfg}/train.json", *cli_args(overrides))
    assert proc.returncode != 0 and "--adapt_in_channels true" in output_of(proc)
    overrides["adapt_in_channels"] = True
    text = assert_ok(run_cli("run", "--config_file", f"{cfg}/train.json", *cli_args(overrides)), "brats from CT")
    assert "adapted: 1 [conv_0.conv_0.conv.weight (4, 1, 3, 3, 3)->(4, 4, 3, 3, 3)]" in text
    # the CT weights were trained on a CT window at another spacing: both differences are named
    assert "spacing: weights [1.5, 1.5, 2.0], this bundle [1.0, 1.0, 1.0]" in text
    assert "intensity: weights" in text
    model = torch.load(tmp_path / "run" / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert model["conv_0.conv_0.conv.weight"].shape[1] == 4
    # the finetuned model carries its own record (it may seed another finetune)
    record = read_provenance(tmp_path / "run" / "models" / "model.pt")
    assert record["source"] == "hybridmim_unet_brats" and record["in_channels"] == 4
    assert record["preprocessing"]["intensity"]["kind"] == "zscore" and record["steps_done"] >= 1


@pytest.mark.slow
def test_import_weights_then_finetune_from_the_result(tmp_path, ct_pool):
    from tools.data.make_demo_data import make_ct_dataset

    src = tmp_path / "model_swinvit.pt"
    torch.save(tang_swinvit_file(swin_state(seed=1, feature_size=WIDTH)), src)
    out = tmp_path / "hybridmim_swin_pretrain"
    shutil.copytree(os.path.join(BUNDLES_DIR, "hybridmim_swin_pretrain"), out)
    tool = [sys.executable, os.path.join(REPO_ROOT, "tools", "weights", "import_weights.py"), str(src),
            "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(tool, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "pretrained_scope" in proc.stdout + proc.stderr  # covers the encoder only
    proc = subprocess.run(tool + ["--scope", "encoder"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--downsample \"merging_legacy\"" in proc.stdout and "--pretrained_scope encoder" in proc.stdout
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state and all(k.startswith("swinViT.") for k in state)  # the decoder is absent, not random
    record = read_provenance(out / "models" / "model.pt")
    assert record["layout"] == "tang_ssl_swinvit" and record["downsample"] == "merging_legacy"
    assert record["width"] == WIDTH and record["preprocessing"]["intensity"]["a_min"] == -1000.0
    again = subprocess.run(tool + ["--scope", "encoder"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "--force" in again.stderr

    datalist = make_ct_dataset(str(tmp_path / "spleen"), num_classes=2)
    overrides = dict(train_overrides("swin", "msd_spleen", str(tmp_path / "run"), datalist),
                     pretrained_path=str(out), pretrained_scope="encoder", downsample="merging_legacy")
    text = assert_ok(run_cli("run", "--config_file", f"{configs('swin', 'msd_spleen')}/train.json",
                             *cli_args(overrides)), "finetune from imported weights")
    assert f"loaded: {len(state)}" in text and "patch merging 'merging_legacy' matches" in text
