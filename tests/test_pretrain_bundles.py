"""End-to-end checks of the four HybridMIM pretraining bundles, shrunk through overrides only.

Each bundle is run through the MONAI CLI (``python -m monai.bundle run``) on tiny synthetic data from
``tools/data/make_demo_data.py``: train one epoch of two steps (with validation), check that ``models/model.pt`` loads into
the finetuning network (plain MONAI SwinUNETR/BasicUNet with another ``out_channels``) with only the last layer new,
run ``evaluate.json`` and ``inference.json``, and resume from the full checkpoint. One bundle is also trained with two
CPU processes (torchrun, gloo). Checkpoints and outputs go to tmp dirs, never into the repository.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
SCHEMA = os.path.join(REPO_ROOT, "tools", "bundles", "schema", "meta_schema_20240725.json")  # vendored

PRETRAIN_BUNDLES = {
    "hybridmim_swin_pretrain": ("swin", "ct"),
    "hybridmim_unet_pretrain": ("unet", "ct"),
    "hybridmim_swin_pretrain_brats": ("swin", "brats"),
    "hybridmim_unet_pretrain_brats": ("unet", "brats"),
}
WIDTH = {"swin": ["--feature_size", "12"], "unet": ["--features", "[4,4,8,8,16,4]"]}
SHAPE = ["--roi_size", "[64,64,64]", "--region_size", "[32,32,32]"]
TRAIN_SMALL = [
    "--steps_per_epoch", "2",
    "--train#trainer#max_epochs", "1",
    "--train#dataloader#num_workers", "0",
    "--validate#dataloader#num_workers", "0",
    "--batch_size", "1",
    "--samples_per_volume", "1",
    "--val_interval", "1",
    "--amp", "false",
]
TIMEOUT = 600


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # the tests share 2 cores (pytest-xdist): no thread oversubscription
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args: list[str], cwd: str, what: str) -> str:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{output[-6000:]}"
    return output


def _bundle_run(name: str, configs: list[str], overrides: list[str], what: str) -> str:
    bundle = os.path.join(BUNDLES_DIR, name)
    config_file = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file,
            "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
            "--bundle_root", bundle, *overrides]
    return _run(args, cwd=bundle, what=f"{name}: {what}")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Tiny datasets: ``{"ct": (dataset_dir, datalist), "brats": (...)}``, two validation volumes each (DDP)."""
    sys.path.insert(0, REPO_ROOT)
    from tools.data.make_demo_data import make_brats_dataset, make_unlabeled_ct_pool

    root = tmp_path_factory.mktemp("pretrain_data")
    ct = make_unlabeled_ct_pool(str(root / "ct"), n_train=2, n_val=2, n_test=1)
    brats = make_brats_dataset(str(root / "brats"), n_train=2, n_val=2, n_test=1)
    return {"ct": (os.path.dirname(ct), ct), "brats": (os.path.dirname(brats), brats)}


def _data_overrides(demo_data, data: str) -> list[str]:
    dataset_dir, datalist = demo_data[data]
    return ["--dataset_dir", dataset_dir, "--data_list_file_path", datalist]


def _finetune_network(backbone: str, in_channels: int):
    from monai.networks.nets import BasicUNet, SwinUNETR

    if backbone == "swin":
        return SwinUNETR(in_channels=in_channels, out_channels=3, feature_size=12), "out."
    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=3, features=(4, 4, 8, 8, 16, 4)), "final_conv."


def _checkpoint_iteration(path: str) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return int(state["trainer"]["iteration"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRETRAIN_BUNDLES))
def test_pretrain_bundle_end_to_end(name, demo_data, tmp_path):
    backbone, data = PRETRAIN_BUNDLES[name]
    in_channels = 1 if data == "ct" else 4
    ckpt_dir, out_dir = tmp_path / "models", tmp_path / "eval"
    common = [*_data_overrides(demo_data, data), *WIDTH[backbone], *SHAPE, "--ckpt_dir", str(ckpt_dir)]

    # --- train: one epoch of two steps, validation at its end --------------------------------------------------
    log = _bundle_run(name, ["configs/train.json"], [*common, *TRAIN_SMALL, "--output_dir", str(out_dir)], "train")
    for term in ("train_loss", "train_reconstruction", "train_number", "train_location", "train_consistency",
                 "train_contrastive", "lr"):
        assert f"{term}:" in log, f"{term} not logged"
    assert "val_recon_mse" in log and "val_number_acc" in log and "val_location_acc" in log
    for f in ("model.pt", "pretrain_network.pt", "checkpoint_final.pt"):
        assert (ckpt_dir / f).is_file(), f"{f} not written: {os.listdir(ckpt_dir)}"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out_dir))
    assert _checkpoint_iteration(str(ckpt_dir / "checkpoint_final.pt")) == 2

    # --- model.pt: flat backbone state dict loading into the finetune network but for its last layer ---------------
    state = torch.load(str(ckpt_dir / "model.pt"), map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values()), "model.pt must be a flat state dict"
    net, last = _finetune_network(backbone, in_channels)
    target = net.state_dict()
    assert set(state) == set(target), set(state) ^ set(target)
    differing = sorted(k for k in target if target[k].shape != state[k].shape)
    assert differing and all(k.startswith(last) for k in differing), differing
    missing, unexpected = net.load_state_dict({k: v for k, v in state.items() if not k.startswith(last)}, strict=False)
    assert not unexpected and missing and all(k.startswith(last) for k in missing), (missing, unexpected)
    from hybridmim_components import load_pretrained_weights

    report = load_pretrained_weights(_finetune_network(backbone, in_channels)[0], str(ckpt_dir / "model.pt"))
    assert not report["unexpected"] and all(k.startswith(last) for k in report["left_to_train"])

    # --- evaluate: pretext metrics of the saved model on the validation list -----------------------------------
    eval_dir = tmp_path / "evaluate"
    _bundle_run(name, ["configs/train.json", "configs/evaluate.json"],
                [*common, "--output_dir", str(eval_dir), "--validate#dataloader#num_workers", "0"], "evaluate")
    metrics = _read_metrics(eval_dir / "metrics.csv")
    pretext = {"val_recon_mse", "val_number_acc", "val_location_acc"}
    assert set(metrics) == pretext | {f"{m}_baseline" for m in pretext}, metrics
    assert 0 < metrics["val_number_acc_baseline"] < 1 and metrics["val_location_acc_baseline"] >= 0.5
    # same weights (model.pt + pretrain_network.pt), same seeded masks: the validation run's figures again
    logged = _logged_metrics(log)
    for key, value in metrics.items():
        assert abs(value - logged[key]) < 1e-4, (key, value, logged[key])
    assert metrics["val_recon_mse"] >= 0 and 0 <= metrics["val_number_acc"] <= 1 and 0 <= metrics["val_location_acc"] <= 1

    # --- inference: masked input and region reconstruction per testing volume, side by side -----------------------
    inf_dir = tmp_path / "inference"
    _bundle_run(name, ["configs/inference.json"],
                [*common, "--output_dir", str(inf_dir), "--dataloader#num_workers", "0"], "inference")
    _check_inference_outputs(inf_dir, demo_data[data][1], in_channels)

    # --- resume: a second epoch continues from the full checkpoint -----------------------------------------------
    log = _bundle_run(name, ["configs/train.json"],
                      [*common, *TRAIN_SMALL, "--output_dir", str(out_dir), "--train#trainer#max_epochs", "2",
                       "--resume", "true"], "resume")
    assert "resuming from" in log
    assert _checkpoint_iteration(str(ckpt_dir / "checkpoint_final.pt")) == 4
    # the best validation of the first run was restored and compared against (lower MSE is better)
    best = torch.load(str(ckpt_dir / "checkpoint_final.pt"), map_location="cpu", weights_only=True)["best_validation"]
    second = _logged_metrics(log)["val_recon_mse"]
    assert best["best_metric"] == pytest.approx(min(metrics["val_recon_mse"], second), abs=1e-4)
    assert best["best_metric_epoch"] == (1 if metrics["val_recon_mse"] <= second else 2)


def _logged_metrics(log: str) -> dict[str, float]:
    """Metrics of the last "Epoch[n] Metrics -- name: value ..." line of a training log."""
    line = [l for l in log.splitlines() if "Metrics -- " in l][-1]
    words = line.split("Metrics -- ")[1].split()
    return {words[i].rstrip(":"): float(words[i + 1]) for i in range(0, len(words) - 1, 2)}


def _read_metrics(path) -> dict[str, float]:
    metrics = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.replace("\t", ",").strip().split(",")
            if len(parts) >= 2:
                metrics[parts[0]] = float(parts[1])
    return metrics


def _check_inference_outputs(inf_dir, datalist: str, in_channels: int) -> None:
    import nibabel as nib
    import numpy as np

    with open(datalist, encoding="utf-8") as f:
        testing = json.load(f)["testing"]
    assert len(os.listdir(inf_dir)) == len(testing)
    for case in os.listdir(inf_dir):
        masked = nib.load(str(inf_dir / case / f"{case}_masked.nii.gz"))
        recon = nib.load(str(inf_dir / case / f"{case}_reconstruction.nii.gz"))
        original = nib.load(str(inf_dir / case / f"{case}_original.nii.gz"))
        # the unmasked crop beside the masked one: same grid, equal wherever no patch was masked
        assert original.shape == masked.shape
        np.testing.assert_allclose(original.affine, masked.affine)
        differs = original.get_fdata() != masked.get_fdata()
        assert 0 < differs.mean() < 1
        spatial = lambda img: img.shape[:3]  # noqa: E731
        assert spatial(masked) == (64, 64, 64) and spatial(recon) == (32, 32, 32), (masked.shape, recon.shape)
        if in_channels > 1:
            assert masked.shape[-1] == in_channels and recon.shape[-1] == in_channels
        # the region is centred: its first voxel sits 16 voxels into the crop, in world coordinates too
        expected_origin = masked.affine @ np.array([16, 16, 16, 1.0])
        np.testing.assert_allclose(recon.affine[:, 3], expected_origin, atol=1e-4)
        assert np.isfinite(recon.get_fdata()).all()


def test_pretrain_inference_masks_are_seeded(demo_data):
    """inference.json seeds its masks: two fresh parses draw the same mask for the first testing volume."""
    from monai.bundle import ConfigParser

    bundle = os.path.join(BUNDLES_DIR, "hybridmim_unet_pretrain")
    masks = []
    for _ in range(2):
        parser = ConfigParser()
        parser.read_config(os.path.join(bundle, "configs", "inference.json"))
        parser.update({"bundle_root": bundle, "dataset_dir": demo_data["ct"][0],
                       "data_list_file_path": demo_data["ct"][1], "roi_size": [64, 64, 64],
                       "region_size": [32, 32, 32], "dataloader#num_workers": 0})
        parser.get_parsed_content("initialize#0")  # set_determinism(seed=@seed)
        batch = next(iter(parser.get_parsed_content("dataloader")))
        masks.append(batch["mim_patch_mask"])
    assert masks[0].any() and torch.equal(masks[0], masks[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_pretrain_multi_gpu_config_two_cpu_processes(demo_data, tmp_path):
    """torchrun with 2 CPU processes (gloo): DDP training, validation metrics reduced over ranks, rank 0 saves."""
    name = "hybridmim_unet_pretrain"
    bundle = os.path.join(BUNDLES_DIR, name)
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
            f"--master_port={_free_port()}", "-m", "monai.bundle", "run",
            "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
            "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
            "--bundle_root", bundle, *_data_overrides(demo_data, "ct"), *WIDTH["unet"], *SHAPE, *TRAIN_SMALL,
            "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]
    proc = subprocess.run(args, cwd=bundle, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"2-process DDP training failed (exit {proc.returncode}):\n{output[-6000:]}"
    log, ckpt_dir = output, tmp_path / "models"
    assert log.count("Metrics -- ") == 1, "validation metrics must be logged by rank 0 only"
    assert (ckpt_dir / "model.pt").is_file() and (ckpt_dir / "checkpoint_final.pt").is_file()
    state = torch.load(str(ckpt_dir / "model.pt"), map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    full = torch.load(str(ckpt_dir / "checkpoint_final.pt"), map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in full["network"])


# --- fast checks (no training) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRETRAIN_BUNDLES))
def test_pretrain_bundle_check_properties(name, demo_data, tmp_path):
    from monai.bundle import ConfigWorkflow

    backbone, data = PRETRAIN_BUNDLES[name]
    bundle = os.path.join(BUNDLES_DIR, name)
    dataset_dir, datalist = demo_data[data]
    common = dict(bundle_root=bundle, dataset_dir=dataset_dir, data_list_file_path=datalist,
                  ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"), roi_size=[64, 64, 64],
                  region_size=[32, 32, 32])
    common.update({"feature_size": 12} if backbone == "swin" else {"features": [4, 4, 8, 8, 16, 4]})
    for workflow_type, config, extra in (
        ("train", "train.json", {"cache_rate": 0, "train#dataloader#num_workers": 0}),
        ("inference", "inference.json", {}),
    ):
        workflow = ConfigWorkflow(
            config_file=os.path.join(bundle, "configs", config),
            meta_file=os.path.join(bundle, "configs", "metadata.json"),
            logging_file=False,
            workflow_type=workflow_type,
            initialize=[],  # no weights to load, no savers to attach: only the properties are checked
            **common,
            **extra,
        )
        workflow.initialize()
        assert workflow.check_properties() == [], f"{name} {workflow_type}"


@pytest.mark.parametrize("name", sorted(PRETRAIN_BUNDLES))
def test_pretrain_bundle_contract_keys(name):
    from monai.bundle import ConfigParser

    backbone, data = PRETRAIN_BUNDLES[name]
    configs = os.path.join(BUNDLES_DIR, name, "configs")
    train = ConfigParser.load_config_file(os.path.join(configs, "train.json"))
    parser = ConfigParser(train)
    for key in ("bundle_root", "device", "dataset_dir", "data_list_file_path", "ckpt_dir", "output_dir", "roi_size",
                "network_def", "network", "val_interval", "train#trainer#max_epochs", "train#dataset#data",
                "validate#dataset#data", "train#dataloader#num_workers", "train#handlers", "validate#evaluator",
                "amp", "resume", "sub_volume_size", "patch_size", "mask_ratio", "region_size", "loss"):
        assert key in parser, f"{name}: missing contract key {key}"
    width = "feature_size" if backbone == "swin" else "features"
    assert parser[f"network_def#{width}"] == f"@{width}"
    # paper defaults
    roi, region, volumes = (96, 64, 2) if data == "ct" else (128, 96, 1)
    assert parser["roi_size"] == [roi] * 3 and parser["region_size"] == [region] * 3
    assert parser["in_channels"] == (1 if data == "ct" else 4)
    assert parser["batch_size"] * parser["samples_per_volume"] == 2 * volumes
    assert parser["steps_per_epoch"] * parser["train#trainer#max_epochs"] == 100_000
    assert (parser["learning_rate"], parser["weight_decay"], parser["warmup_steps"]) == (1e-4, 1e-5, 500)
    assert parser["train#trainer#epoch_length"] == "@steps_per_epoch"
    for other in ("inference.json", "evaluate.json", "multi_gpu_train.json"):
        assert os.path.isfile(os.path.join(configs, other))


@pytest.mark.parametrize("name", sorted(PRETRAIN_BUNDLES))
def test_pretrain_bundle_verify_metadata(name, tmp_path):
    from monai.bundle import verify_metadata

    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)
    verify_metadata(meta_file=os.path.join(BUNDLES_DIR, name, "configs", "metadata.json"), filepath=str(schema))


def test_pretrain_bundles_match_generator():
    sys.path.insert(0, REPO_ROOT)
    from tools.bundles.bundlegen.pretrain import bundles
    from tools.bundles.generate_bundles import render

    for name, files in bundles().items():
        for rel, content in files.items():
            with open(os.path.join(BUNDLES_DIR, name, rel), encoding="utf-8") as f:
                assert f.read() == render(content), f"{name}/{rel} is out of date: run python tools/bundles/generate_bundles.py"


def _initialized_network_weights(name: str, demo_data, tmp_path, rng_seed: int) -> dict:
    """Run a pretraining bundle's ``initialize`` in process (as ``monai.bundle run`` does) with the global RNG at
    ``rng_seed`` beforehand; return the network's initial weights."""
    from monai.bundle import ConfigWorkflow

    backbone, data = PRETRAIN_BUNDLES[name]
    bundle = os.path.join(BUNDLES_DIR, name)
    dataset_dir, datalist = demo_data[data]
    workflow = ConfigWorkflow(
        config_file=os.path.join(bundle, "configs", "train.json"), logging_file=False, workflow_type="train",
        bundle_root=bundle, dataset_dir=dataset_dir, data_list_file_path=datalist, ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"), roi_size=[64, 64, 64], region_size=[32, 32, 32], cache_rate=0,
        **{"train#dataloader#num_workers": 0, "validate#dataloader#num_workers": 0},
        **({"feature_size": 12} if backbone == "swin" else {"features": [4, 4, 8, 8, 16, 4]}),
    )
    torch.manual_seed(rng_seed)  # whatever ran before in the process must not matter
    workflow.initialize()
    return {k: v.clone() for k, v in workflow.parser.get_parsed_content("network_def").state_dict().items()}


@pytest.mark.parametrize("name", ["hybridmim_unet_pretrain", "hybridmim_swin_pretrain"])
def test_pretrain_initial_weights_are_seeded(name, demo_data, tmp_path):
    """``initialize`` seeds before the network is built: two builds in one process start from the same weights."""
    first = _initialized_network_weights(name, demo_data, tmp_path, rng_seed=1)
    second = _initialized_network_weights(name, demo_data, tmp_path, rng_seed=2)
    assert first.keys() == second.keys()
    differing = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differing, f"initial weights differ between two builds: {differing[:5]}"


@pytest.mark.parametrize("name", sorted(os.listdir(BUNDLES_DIR)))
def test_multi_gpu_seed_differs_per_rank(name, monkeypatch):
    """Under torchrun each rank seeds with ``seed + RANK``: different crops/masks per GPU, reproducible per rank."""
    from monai.bundle import ConfigParser

    configs = os.path.join(BUNDLES_DIR, name, "configs")
    parser = ConfigParser()
    parser.read_config([os.path.join(configs, "train.json"), os.path.join(configs, "multi_gpu_train.json")])
    seeding = [i for i, expr in enumerate(parser["initialize"]) if "set_determinism" in expr]
    assert len(seeding) == 1, parser["initialize"]

    def draws(rank: int) -> torch.Tensor:
        monkeypatch.setenv("RANK", str(rank))
        torch.manual_seed(1000 + rank)  # the seeding expression alone decides the draws
        parser.parse(reset=True)
        parser.get_parsed_content(f"initialize#{seeding[0]}")
        return torch.randint(0, 2**30, (4,))

    assert not torch.equal(draws(0), draws(1))
    assert torch.equal(draws(1), draws(1))


def _logged_term_per_iteration(log: str, term: str) -> dict[int, float]:
    """``{iteration: value}`` of one loss term from the StatsHandler lines ``Epoch: e/E, Iter: i/n -- ... term: v``
    (a line may follow a progress-bar fragment on the same console line)."""
    import re

    pattern = re.compile(r"Iter: (\d+)/\d+ -- [^\n]*?\b" + re.escape(term) + r": (\S+)")
    return {int(i): float(v) for i, v in pattern.findall(log)}


@pytest.mark.slow
@pytest.mark.parametrize("batch_size,samples_per_volume", [(1, 2), (1, 1)])
def test_pretrain_contrastive_term_is_positive_with_two_crops_per_step(demo_data, tmp_path, batch_size,
                                                                         samples_per_volume):
    """Two crops per step (here two samples of one volume): the logged contrastive term is > 0 at every iteration.

    One crop per step: the term is exactly 0 (one positive, no negatives) and the start-up warning says so.
    """
    name = "hybridmim_unet_pretrain"
    overrides = [*_data_overrides(demo_data, "ct"), *WIDTH["unet"], *SHAPE, *TRAIN_SMALL,
                 "--batch_size", str(batch_size), "--samples_per_volume", str(samples_per_volume),
                 "--val_interval", "1000",  # no validation: only the training log matters here
                 "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]
    log = _bundle_run(name, ["configs/train.json"], overrides, "train")
    contrastive = _logged_term_per_iteration(log, "train_contrastive")
    assert sorted(contrastive) == [1, 2], f"expected iterations 1 and 2 in the log, got {contrastive}"
    warnings = [line for line in log.splitlines() if "one positive and no negatives" in line]
    if batch_size * samples_per_volume >= 2:
        assert all(value > 0 for value in contrastive.values()), contrastive
        assert not warnings
    else:
        assert all(value == 0 for value in contrastive.values()), contrastive
        assert len(warnings) == 1 and " - WARNING - contrastive_weight=0.1 but each step has 1 crop" in warnings[0]
