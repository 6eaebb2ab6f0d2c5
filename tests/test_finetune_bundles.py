"""The eight finetuning bundles ``hybridmim_{swin,unet}_{btcv,msd_spleen,msd_liver,brats}``.

End to end through the MONAI CLI on CPU (``python -m monai.bundle ...`` in a subprocess, overrides only) on tiny
synthetic data from ``tools/data/make_demo_data.py``, starting from the weights of a tiny pretraining backbone: train one
epoch, resume, evaluate, infer, ``verify_net_in_out``, ``ckpt_export``; a wrong backbone's weights stop the run
before training. In process: properties, metadata schema, weight transfer into encoder and decoder, label fraction.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tools.bundles.bundlegen.finetune import BACKBONES, TASKS, bundle_name

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
SCHEMA = os.path.join(REPO_ROOT, "tools", "bundles", "schema", "meta_schema_20240725.json")  # vendored

CASES = [(backbone, task) for backbone in BACKBONES for task in TASKS]
IDS = [bundle_name(b, t) for b, t in CASES]
# resume is checked on one bundle per backbone (the resume logic is generated identically for all eight)
RESUME_CASES = {("swin", "msd_spleen"), ("unet", "brats")}
# CI repeats this one under MONAI 1.5.x (MONAI Label 0.8.5's MONAI) and under the next MONAI (monai-weekly): a CT
# bundle, so Spacingd is on the path, and the cheapest one (UNet, 32^3 crops, no resume)
MONAI15_CASE = ("unet", "msd_spleen")
# verify_net_in_out and ckpt_export through the CLI as the bundle READMEs write them, on one bundle per backbone:
# tests/test_verify_bundles.py runs both checks on every bundle in process (a CLI start costs ~10 s of imports)
CLI_EXPORT_CASES = {MONAI15_CASE, ("swin", "btcv")}
END_TO_END_CASES = [
    pytest.param(b, t, id=bundle_name(b, t),
                 marks=[pytest.mark.monai15, pytest.mark.monai_next] if (b, t) == MONAI15_CASE else [])
    for b, t in CASES
]

SWIN_WIDTH = 12
UNET_FEATURES = [4, 4, 8, 8, 16, 4]
NUM_CLASSES = {"btcv": 14, "msd_spleen": 2, "msd_liver": 3}


# ----------------------------------------------------------------------------------------------------------- helpers
def configs(backbone: str, task: str) -> str:
    return os.path.join(BUNDLES_DIR, bundle_name(backbone, task), "configs")


def width_overrides(backbone: str) -> dict:
    return {"feature_size": SWIN_WIDTH} if backbone == "swin" else {"features": UNET_FEATURES}


def roi(backbone: str) -> list[int]:
    # SwinUNETR cannot train on 32^3 (one-voxel bottleneck under instance norm); 64^3 is its smallest crop
    return [64, 64, 64] if backbone == "swin" else [32, 32, 32]


def cli_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def output_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def assert_ok(proc: subprocess.CompletedProcess, what: str) -> str:
    text = output_of(proc)
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{text[-6000:]}"
    return text


def pretrain_backbone(backbone: str, in_channels: int):
    import hybridmim_components as hc

    if backbone == "swin":
        return hc.HybridMIMSwinUNETR(in_channels=in_channels, feature_size=SWIN_WIDTH).backbone
    return hc.HybridMIMUNet(in_channels=in_channels, features=UNET_FEATURES).backbone


# ---------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("finetune")


_datasets: dict = {}


@pytest.fixture(scope="module")
def dataset(workdir):
    """``dataset(task) -> datalist path`` (built once per task and process)."""
    from tools.data.make_demo_data import make_brats_dataset, make_ct_dataset

    def get(task: str) -> str:
        if task not in _datasets:
            out = str(workdir / f"data_{task}")
            if task == "brats":
                _datasets[task] = make_brats_dataset(out)
            else:
                _datasets[task] = make_ct_dataset(out, num_classes=NUM_CLASSES[task])
        return _datasets[task]

    return get


@pytest.fixture(scope="module")
def pretrained(workdir):
    """``pretrained(backbone, in_channels) -> path`` of a tiny pretraining backbone's state dict (flat)."""
    cache: dict = {}

    def get(backbone: str, in_channels: int) -> str:
        key = (backbone, in_channels)
        if key not in cache:
            torch.manual_seed(0)
            path = str(workdir / f"pretrained_{backbone}_{in_channels}ch.pt")
            torch.save(pretrain_backbone(backbone, in_channels).state_dict(), path)
            cache[key] = path
        return cache[key]

    return get


def base_overrides(backbone: str, task: str, bundle_root: str, datalist: str) -> dict:
    return {
        "bundle_root": bundle_root,
        "dataset_dir": os.path.dirname(datalist),
        "data_list_file_path": os.path.basename(datalist),
        "roi_size": roi(backbone),
        "amp": False,
        **width_overrides(backbone),
    }


def train_overrides(backbone: str, task: str, bundle_root: str, datalist: str) -> dict:
    o = base_overrides(backbone, task, bundle_root, datalist)
    o.update(
        {
            "num_samples": 1,
            "cache_rate": 0,
            "train#dataloader#num_workers": 0,
            "val_interval": 1,
            "train#trainer#max_epochs": 1,
        }
    )
    if backbone == "swin":
        o["use_checkpoint"] = False
    return o


# ------------------------------------------------------------------------------------------------- end-to-end (CLI)
@pytest.mark.slow
@pytest.mark.parametrize("backbone,task", END_TO_END_CASES)
def test_bundle_end_to_end(backbone, task, workdir, dataset, pretrained):
    t = TASKS[task]
    cfg = configs(backbone, task)
    datalist = dataset(task)
    root = str(workdir / f"root_{backbone}_{task}")
    os.makedirs(root, exist_ok=True)
    weights = pretrained(backbone, t["in_channels"])
    scored = [slug for _, slug in t["classes"]][0 if t["sigmoid"] else 1 :]

    # 1. train one epoch from the pretrained backbone, on half of the 2 training cases (label_fraction)
    overrides = train_overrides(backbone, task, root, datalist)
    overrides.update({"pretrained_path": weights, "label_fraction": 0.5})
    text = assert_ok(run_cli("run", "--config_file", f"{cfg}/train.json", *cli_args(overrides)), "train")
    assert f"pretrained weights {weights}:" in text, "the log must name the pretrained weights file"
    n_params = len(pretrain_backbone(backbone, t["in_channels"]).state_dict())
    assert f"loaded: {n_params - 2}" in text and "unexpected: 0" in text and "left_to_train: 2" in text, text[-4000:]
    assert "Iter: 1/1" in text, "label_fraction 0.5 of 2 training cases must leave 1 (one iteration per epoch)"
    assert "Epoch[1] Complete" in text and "val_mean_dice" in text
    for slug in scored:
        assert f"val_dice_{slug}:" in text, f"per-class Dice of {slug} not logged"
    models = os.path.join(root, "models")
    best = torch.load(os.path.join(models, "model.pt"), weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in best.values()), "models/model.pt must be a flat state dict"
    assert os.path.isfile(os.path.join(models, "checkpoint_final.pt"))

    # 2. resume: continue to epoch 2 from the full checkpoint, without redoing epoch 1
    if (backbone, task) in RESUME_CASES:
        overrides.update({"resume": True, "train#trainer#max_epochs": 2})
        text = assert_ok(run_cli("run", "--config_file", f"{cfg}/train.json", *cli_args(overrides)), "resume")
        assert "resuming from full checkpoint" in text and "checkpoint_final.pt" in text
        assert "Epoch[2] Complete" in text and "Epoch[1] Complete" not in text, text[-4000:]
        state = torch.load(os.path.join(models, "checkpoint_final.pt"), weights_only=True)["trainer"]
        assert (state["iteration"], state["max_epochs"]) == (2, 2)  # one iteration per epoch

    # 3. evaluate: Dice and HD95 per class at the original resolution, to CSV
    ev = base_overrides(backbone, task, root, datalist)
    ev.update({"cache_rate": 0, "train#dataloader#num_workers": 0, "output_dir": f"{root}/eval_metrics"})
    text = assert_ok(
        run_cli("run", "--config_file", f"['{cfg}/train.json','{cfg}/evaluate.json']", *cli_args(ev)), "evaluate"
    )
    # one segmentation per validation case, at the input image's geometry (the preprocessing inverted)
    check_predictions(datalist, os.path.join(root, "eval_metrics"), t, split="validation")
    with open(os.path.join(root, "eval_metrics", "metrics.csv"), newline="") as f:
        metrics = {row[0]: float(row[1]) for row in csv.reader(f)}
    for slug in scored:
        assert f"val_dice_{slug}" in metrics and f"val_hd95_{slug}" in metrics, sorted(metrics)
        assert f"val_hd95_{slug}:" in text
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0
    for name in ("val_mean_dice_raw.csv", "val_mean_hd95_raw.csv"):
        assert os.path.isfile(os.path.join(root, "eval_metrics", name))

    # 4. inference on the testing list: one label map per input, same shape and affine as the input image
    inf = base_overrides(backbone, task, root, datalist)
    inf.update({"dataloader#num_workers": 0, "output_dir": f"{root}/predictions"})
    assert_ok(run_cli("run", "--config_file", f"{cfg}/inference.json", *cli_args(inf)), "inference")
    check_predictions(datalist, os.path.join(root, "predictions"), t)

    # 5. network input/output against the metadata, and TorchScript export by tracing
    if (backbone, task) in CLI_EXPORT_CASES:
        check_cli_export(backbone, cfg, os.path.join(models, "model.pt"), os.path.join(root, "model.ts"))

    # 6. properties (train and inference) of the trained bundle, in process
    check_properties(backbone, task, root, datalist)


def check_cli_export(backbone: str, cfg: str, weights: str, ts: str) -> None:
    """``verify_net_in_out`` and ``ckpt_export`` (traced) through the CLI, as the bundle README writes them."""
    meta = f"{cfg}/metadata.json"
    width = cli_args(width_overrides(backbone))
    assert_ok(
        run_cli("verify_net_in_out", "network_def", "--meta_file", meta, "--config_file", f"{cfg}/inference.json",
                "--device", "cpu", *width),
        "verify_net_in_out",
    )
    assert_ok(
        run_cli("ckpt_export", "network_def", "--filepath", ts, "--ckpt_file", weights, "--meta_file", meta,
                "--config_file", f"{cfg}/inference.json", "--use_trace", "True",
                "--converter_kwargs", "{'check_trace': False}", *width),
        "ckpt_export",
    )
    assert os.path.getsize(ts) > 0


def check_predictions(datalist: str, out_dir: str, t: dict, split: str = "testing") -> None:
    """One ``<image>_seg.nii.gz`` label map per entry of ``split`` with the input image's shape and affine."""
    import nibabel as nib
    import numpy as np

    with open(datalist) as f:
        testing = json.load(f)[split]
    outputs = sorted(glob.glob(os.path.join(out_dir, "*.nii.gz")))
    assert len(outputs) == len(testing), outputs
    for entry in testing:
        image = entry["image"][0] if isinstance(entry["image"], list) else entry["image"]
        stem = os.path.basename(image)[: -len(".nii.gz")]
        out = os.path.join(out_dir, f"{stem}_seg.nii.gz")
        assert os.path.isfile(out), f"no prediction for {image}: {outputs}"
        src, pred = nib.load(os.path.join(os.path.dirname(datalist), image)), nib.load(out)
        assert pred.shape == src.shape, (pred.shape, src.shape)
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
        values = set(np.unique(np.asarray(pred.dataobj)).tolist())
        allowed = {0, 1, 2, 4} if t["sigmoid"] else set(range(len(t["classes"])))
        assert values <= allowed, values


def check_properties(backbone: str, task: str, root: str, datalist: str) -> None:
    from monai.bundle import ConfigWorkflow

    cfg = configs(backbone, task)
    common = {
        "bundle_root": root,
        "dataset_dir": os.path.dirname(datalist),
        "data_list_file_path": os.path.basename(datalist),
        **width_overrides(backbone),
    }
    train = ConfigWorkflow(
        config_file=f"{cfg}/train.json", workflow_type="train", logging_file=False,
        pretrained_path="", cache_rate=0, **common,
    )
    train.initialize()
    assert train.check_properties() == []
    infer = ConfigWorkflow(config_file=f"{cfg}/inference.json", workflow_type="inference", logging_file=False,
                           **common)
    infer.initialize()  # loads the trained models/model.pt
    assert infer.check_properties() == []


# UNet weights into every Swin bundle, Swin weights into one UNet bundle (the check runs in `initialize`, generated
# identically for all eight; each case costs a CLI start)
WRONG_CASES = [(b, t) for b, t in CASES if b == "swin"] + [("unet", "btcv")]


@pytest.mark.slow
@pytest.mark.parametrize("backbone,task", WRONG_CASES, ids=[bundle_name(b, t) for b, t in WRONG_CASES])
def test_wrong_backbone_weights_stop_before_training(backbone, task, workdir, dataset, pretrained):
    """UNet weights into a Swin bundle (and Swin weights into a UNet bundle) stop with the loader's report."""
    t = TASKS[task]
    other = "unet" if backbone == "swin" else "swin"
    root = str(workdir / f"wrong_{backbone}_{task}")
    overrides = train_overrides(backbone, task, root, dataset(task))
    overrides["pretrained_path"] = pretrained(other, t["in_channels"])
    proc = run_cli("run", "--config_file", f"{configs(backbone, task)}/train.json", *cli_args(overrides))
    text = output_of(proc)
    assert proc.returncode != 0
    assert "PretrainedWeightsError" in text and "did not load" in text and "missing:" in text, text[-4000:]
    assert "Iter:" not in text and "Epoch[1]" not in text, "training must not start"
    assert not os.path.exists(os.path.join(root, "models", "model.pt"))


@pytest.mark.slow
def test_multi_gpu_config_runs_with_gloo_on_cpu(workdir):
    """``multi_gpu_train.json`` under torchrun with 2 CPU processes (gloo): rank 0 logs and saves."""
    from tools.data.make_demo_data import make_ct_dataset

    datalist = make_ct_dataset(str(workdir / "data_ddp"), num_classes=2, n_train=2, n_val=2)
    cfg = configs("unet", "msd_spleen")
    root = str(workdir / "root_ddp")
    overrides = train_overrides("unet", "msd_spleen", root, datalist)
    overrides.update({"pretrained_path": "", "train#trainer#max_epochs": 2})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*torchrun, "-m", "monai.bundle", "run", "--config_file", f"['{cfg}/train.json','{cfg}/multi_gpu_train.json']",
         *cli_args(overrides)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    text = assert_ok(proc, "multi-GPU training")
    assert text.count("Iter: 1/1") == 2, "one iteration per epoch per rank (2 cases / 2 ranks), logged by rank 0 only"
    assert os.path.isfile(os.path.join(root, "models", "model.pt"))
    state = torch.load(os.path.join(root, "models", "checkpoint_final.pt"), weights_only=True)["trainer"]
    assert (state["iteration"], state["max_epochs"]) == (2, 2)


# ------------------------------------------------------------------------------------------------------- in process
@pytest.mark.parametrize("backbone,task", CASES, ids=IDS)
def test_pretrained_weights_fill_encoder_and_decoder(backbone, task, pretrained):
    """The pretraining backbone's state dict loads into the bundle's network_def: all but the last layer."""
    import hybridmim_components as hc
    from monai.bundle import ConfigParser

    t = TASKS[task]
    parser = ConfigParser()
    parser.read_config(f"{configs(backbone, task)}/train.json")
    parser.update(width_overrides(backbone))
    net = parser.get_parsed_content("network_def")
    path = pretrained(backbone, t["in_channels"])
    report = hc.load_pretrained_weights(net, path)
    source = torch.load(path, weights_only=True)
    last = BACKBONES[backbone]["last_layer"].rstrip("*")
    decoder = "decoder1." if backbone == "swin" else "upcat_1."
    assert any(n.startswith(decoder) for n in report["loaded"]), "the decoder must be pretrained too"
    assert any(n.startswith("swinViT." if backbone == "swin" else "conv_0.") for n in report["loaded"])
    assert report["unexpected"] == [] and all(e.startswith(last) for e in report["left_to_train"])
    for name, value in net.state_dict().items():
        if name.startswith(last):
            assert value.shape[0] == len(t["classes"])  # a fresh last layer with one channel per target
        else:
            assert torch.equal(value, source[name]), name


@pytest.mark.parametrize("backbone,task", CASES, ids=IDS)
def test_label_fraction_picks_a_deterministic_nested_share(backbone, task, workdir):
    from monai.bundle import ConfigParser
    from tools.data.make_demo_data import make_brats_dataset, make_ct_dataset

    out = str(workdir / f"data_five_{task}")
    if not os.path.isdir(out):
        make = make_brats_dataset if task == "brats" else make_ct_dataset
        make(out, n_train=5, n_val=1, n_test=1)

    def training_list(fraction):
        parser = ConfigParser()
        parser.read_config(f"{configs(backbone, task)}/train.json")
        parser.update({"dataset_dir": out, "data_list_file_path": "dataset.json", "label_fraction": fraction})
        return parser.get_parsed_content("train#dataset#data")

    chosen = {f: [d["image"] for d in training_list(f)] for f in (0.2, 0.4, 0.6, 1.0)}
    assert {f: len(v) for f, v in chosen.items()} == {0.2: 1, 0.4: 2, 0.6: 3, 1.0: 5}
    assert chosen[0.2] == [d["image"] for d in training_list(0.2)]  # deterministic
    assert set(map(str, chosen[0.2])) <= set(map(str, chosen[0.4])) <= set(map(str, chosen[0.6]))  # nested


@pytest.mark.parametrize("backbone,task", CASES, ids=IDS)
def test_metadata_matches_schema_and_task(backbone, task, tmp_path):
    from monai.bundle import verify_metadata

    t = TASKS[task]
    meta_file = f"{configs(backbone, task)}/metadata.json"
    with open(meta_file) as f:
        meta = json.load(f)
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == t["in_channels"]
    out = fmt["outputs"]["pred"]
    assert out["num_channels"] == len(t["classes"])
    if t["sigmoid"]:
        # MONAI Label reads channel_def as the names of the written label map's values (BraTS 1/2/4)
        assert sorted(map(int, out["channel_def"])) == [0, 1, 2, 4]
    else:
        assert list(out["channel_def"].values()) == [name for name, _ in t["classes"]]
        assert out["channel_def"]["0"] == "background"
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)
    verify_metadata(meta_file=meta_file, filepath=str(schema))


def test_bundles_share_one_skeleton():
    """Same config keys in every bundle (consistent by construction), each referencing its own pretrain bundle."""
    keys = {}
    for backbone, task in CASES:
        with open(f"{configs(backbone, task)}/train.json") as f:
            train = json.load(f)
        keys[(backbone, task)] = set(train) - {"feature_size", "features", "use_checkpoint", "a_min", "a_max",
                                                 "downsample", "use_v2"}  # the last two: SwinUNETR only
        pre = f"hybridmim_{backbone}_pretrain" + ("_brats" if task == "brats" else "")
        assert f"/../{pre}/models/model.pt" in train["pretrained_path"]
        assert train["train"]["trainer"]["max_epochs"] == TASKS[task]["max_epochs"]
        for required in ("bundle_root", "device", "dataset_dir", "data_list_file_path", "ckpt_dir", "output_dir",
                         "roi_size", "network_def", "network", "val_interval", "amp", "resume", "pretrained_path",
                         "label_fraction", BACKBONES[backbone]["width_key"]):
            assert required in train, (bundle_name(backbone, task), required)
        handlers = train["train"]["handlers"]
        validation = [h for h in handlers if h["_target_"] == "ValidationHandler"]
        assert validation == [{"_target_": "ValidationHandler", "validator": "@validate#evaluator",
                               "epoch_level": True, "interval": "@val_interval"}]
        with open(f"{configs(backbone, task)}/inference.json") as f:
            inference = json.load(f)
        for required in ("network_def", "preprocessing", "inferer", "postprocessing", "dataset", "evaluator"):
            assert required in inference
    assert len({frozenset(v) for v in keys.values()}) == 1, keys


# ------------------------------------------------------------------------------------- workflow.finetune components
def test_hausdorff_distance_95_is_in_millimetres():
    pytest.importorskip("scipy")
    from monai.data import MetaTensor

    from hybridmim_components.workflow.finetune import HausdorffDistance95

    label = torch.zeros(2, 12, 12, 12)
    label[1, 3:7, 3:7, 3:7] = 1
    pred = torch.zeros(2, 12, 12, 12)
    pred[1, 5:9, 3:7, 3:7] = 1  # the same cube shifted by 2 voxels along the first axis
    label[0], pred[0] = 1 - label[1], 1 - pred[1]
    affine = torch.diag(torch.tensor([2.5, 1.0, 1.0, 1.0]))  # 2.5 mm along the shift
    handler = HausdorffDistance95(include_background=False)
    handler.metric_fn([MetaTensor(pred, affine=affine)], [MetaTensor(label, affine=affine)])
    assert handler.metric_fn.aggregate().item() == pytest.approx(5.0)  # 2 voxels x 2.5 mm
    plain = HausdorffDistance95(include_background=False)
    plain.metric_fn([pred], [label])
    assert plain.metric_fn.aggregate().item() == pytest.approx(2.0)  # plain tensors: voxels, as MONAI's handler


def test_hausdorff_distance_95_of_a_missed_structure_is_infinite_on_every_monai():
    """A class the prediction misses (or invents) counts as infinitely far, not as absent from the mean.

    MONAI <= 1.6 returns nan at a percentile when one mask is empty, and nan is left out of the mean: a network that
    finds nothing scored HD95 0 here. The next MONAI returns inf (Project-MONAI/MONAI#9096); ours does on both.
    """
    pytest.importorskip("scipy")
    from hybridmim_components.workflow.finetune import HausdorffDistance95

    label = torch.zeros(1, 3, 12, 12, 12)
    label[0, 1, 3:7, 3:7, 3:7] = 1
    label[0, 0] = 1 - label[0, 1]  # class 2 absent from the label
    found = label.clone()
    missed = torch.zeros_like(label)
    missed[0, 0] = 1
    invented = label.clone()
    invented[0, 2, 9:11, 9:11, 9:11] = 1
    handler = HausdorffDistance95(include_background=False)
    for pred in (found, missed, invented):
        handler.metric_fn(pred, label)
    per_case = handler.metric_fn.get_buffer()  # (case, class 1..2)
    assert per_case[0, 0].item() == 0.0 and per_case[1, 0].item() == float("inf"), per_case
    assert per_case[2, 1].item() == float("inf"), per_case  # a class the label does not have, predicted
    assert torch.isnan(per_case[0, 1]) and torch.isnan(per_case[1, 1])  # absent from both: not applicable
    assert handler.metric_fn.aggregate().item() == float("inf")


def test_brats_classes_to_label_map_inverts_the_multichannel_conversion():
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    from hybridmim_components.workflow.finetune import BratsClassesToLabelMapd

    label = torch.zeros(1, 6, 6, 6, dtype=torch.uint8)
    label[0, 1:5, 1:5, 1:5] = 2
    label[0, 2:4, 2:4, 2:4] = 1
    label[0, 3, 3, 3] = 4
    channels = ConvertToMultiChannelBasedOnBratsClasses()(label)  # TC, WT, ET
    out = BratsClassesToLabelMapd(keys="pred")({"pred": channels})["pred"]
    assert out.shape == (1, 6, 6, 6) and torch.equal(torch.as_tensor(out), label)


def test_check_roi_size_names_the_bad_sides():
    from hybridmim_components.workflow.finetune import check_roi_size

    check_roi_size([96, 96, 64], 32)
    with pytest.raises(ValueError, match=r"roi_size=\[96, 96, 48\].*multiples of 32.*\[48\]"):
        check_roi_size([96, 96, 48], 32)
    with pytest.raises(ValueError, match="3 positive multiples of 16"):
        check_roi_size([32, 32], 16)


# ------------------------------------------------------------------------------------- resume, seeding, MONAI Label
def _logged_val_dice(log: str) -> float:
    """``val_mean_dice`` of the last "Metrics -- ..." line of a training log (4 decimals)."""
    line = [l for l in log.splitlines() if "Metrics -- " in l][-1]
    words = line.split("Metrics -- ")[1].split()
    return {words[i].rstrip(":"): float(words[i + 1]) for i in range(0, len(words) - 1, 2)}["val_mean_dice"]


def _weights(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.monai15
def test_resume_keeps_the_best_validation_and_the_optimiser_state(workdir, dataset):
    """Resume continues at the next epoch with the optimiser state, and replaces ``model.pt`` only when better.

    Without the best validation in the full checkpoint, the first validation after a resume always overwrote
    ``model.pt``. Step 3 forces a worse validation: the recorded best is raised above any reachable Dice (1.0).
    """
    backbone, task = "unet", "msd_spleen"
    cfg = f"{configs(backbone, task)}/train.json"
    root = str(workdir / "root_resume_best")
    overrides = train_overrides(backbone, task, root, dataset(task))
    overrides.update({"pretrained_path": "", "label_fraction": 0.5})  # one iteration per epoch
    models = os.path.join(root, "models")
    final = os.path.join(models, "checkpoint_final.pt")

    # 1. one epoch: the full checkpoint records the best validation the evaluator saw
    first = _logged_val_dice(assert_ok(run_cli("run", "--config_file", cfg, *cli_args(overrides)), "train"))
    full = _weights(final)
    assert "best_validation" in full, f"the full checkpoint must record the best validation: {sorted(full)}"
    assert full["best_validation"]["best_metric"] == pytest.approx(first, abs=1e-4)
    assert full["best_validation"]["best_metric_epoch"] == 1
    model_1 = _weights(os.path.join(models, "model.pt"))

    # 2. resume to two epochs: epoch 2 only, optimiser state continued; model.pt replaced only if epoch 2 is better
    overrides.update({"resume": True, "train#trainer#max_epochs": 2})
    text = assert_ok(run_cli("run", "--config_file", cfg, *cli_args(overrides)), "resume")
    assert "Epoch[2] Complete" in text and "Epoch[1] Complete" not in text, text[-4000:]
    full = _weights(final)
    assert full["trainer"]["iteration"] == 2
    steps = {float(s["step"]) for s in full["optimizer"]["state"].values()}
    assert steps == {2.0}, f"AdamW must continue from step 1 (a fresh optimiser would be at step 1): {steps}"
    second = _logged_val_dice(text)
    best = full["best_validation"]
    model_2 = _weights(os.path.join(models, "model.pt"))
    assert best["best_metric"] == pytest.approx(max(first, second), abs=1e-4)
    if abs(second - first) > 1e-4:  # the log has 4 decimals: a tie cannot be ordered from it
        assert best["best_metric_epoch"] == (2 if second > first else 1)
        assert _same_weights(model_2, model_1) == (second < first), (first, second)

    # 3. forced worse validation: with a recorded best of 2.0, epoch 3 must leave model.pt alone
    best["best_metric"] = 2.0
    for saver in best["savers"]:
        saver["_saved"] = [(2.0, filename) for _, filename in saver["_saved"]]
    torch.save(full, final)
    overrides["train#trainer#max_epochs"] = 3
    assert_ok(run_cli("run", "--config_file", cfg, *cli_args(overrides)), "resume with a better recorded best")
    assert _same_weights(_weights(os.path.join(models, "model.pt")), model_2), "a worse validation replaced model.pt"
    best = _weights(final)["best_validation"]
    assert (best["best_metric"], best["best_metric_epoch"]) == (2.0, full["best_validation"]["best_metric_epoch"])


def _initialized_weights(backbone: str, task: str, root: str, datalist: str, rng_seed: int) -> dict:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=f"{configs(backbone, task)}/train.json", workflow_type="train", logging_file=False,
        **{**train_overrides(backbone, task, root, datalist), "pretrained_path": ""},
    )
    torch.manual_seed(rng_seed)  # whatever ran before in the process must not matter
    workflow.initialize()
    return {k: v.clone() for k, v in workflow.parser.get_parsed_content("network_def").state_dict().items()}


def test_finetune_initial_weights_are_seeded(workdir, dataset):
    """``initialize`` seeds before the network is built: two from-scratch builds start from the same weights."""
    root = str(workdir / "root_seeded")
    first = _initialized_weights("unet", "msd_spleen", root, dataset("msd_spleen"), rng_seed=1)
    second = _initialized_weights("unet", "msd_spleen", root, dataset("msd_spleen"), rng_seed=2)
    assert _same_weights(first, second)


def _monai_label_labels(meta: dict) -> dict:
    """Label names as MONAI Label's monaibundle app reads them (``BundleInferTask``): the first entry of
    ``network_data_format.outputs``, ``{name.lower(): int(key)}`` of its ``channel_def``, background left out."""
    _, pred = next(iter(meta["network_data_format"]["outputs"].items()))
    return {v.lower(): int(k) for k, v in pred.get("channel_def", {}).items() if v.lower() != "background"}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_monai_label_names_match_the_written_brats_label_map(backbone):
    """What MONAI Label names each value of the label map that ``inference.json`` writes is what that value is."""
    from monai.bundle import ConfigParser
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses, Invertd, SaveImaged

    cfg = configs(backbone, "brats")
    with open(f"{cfg}/metadata.json") as f:
        labels = _monai_label_labels(json.load(f))
    # a BraTS label map: oedema (2) around a necrotic core (1) around enhancing tumour (4)
    truth = torch.zeros(1, 6, 6, 6, dtype=torch.uint8)
    truth[0, 1:5, 1:5, 1:5] = 2
    truth[0, 2:4, 2:4, 2:4] = 1
    truth[0, 3, 3, 3] = 4
    logits = (ConvertToMultiChannelBasedOnBratsClasses()(truth).float() * 2 - 1) * 10  # TC, WT, ET
    parser = ConfigParser()
    parser.read_config(f"{cfg}/inference.json")
    post = parser.get_parsed_content("postprocessing")
    data = {"pred": logits}
    for transform in post.transforms:
        if not isinstance(transform, (Invertd, SaveImaged)):  # no image to invert to here, nothing to write
            data = transform(data)
    written = torch.as_tensor(data["pred"])
    assert written.shape == truth.shape
    assert set(torch.unique(written).tolist()) - {0} == set(labels.values()), (labels, torch.unique(written))
    name_of = {value: name for name, value in labels.items()}
    for region, word, not_word in ((4, "enhancing", "necrotic"), (1, "necrotic", "edema"), (2, "edema", "enhancing")):
        value = int(written[truth == region][0])
        name = name_of[value]
        assert word in name and not_word not in name, f"MONAI Label shows '{name}' for the {word} voxels ({value})"


def test_one_progress_bar_handler_for_both_bundle_families():
    """Every bundle (pretraining and finetuning) shows the loss with the same progress-bar handler in
    ``train#handlers``; none attaches another one in ``initialize``."""
    targets = set()
    names = sorted(os.listdir(BUNDLES_DIR))
    assert len(names) == 12
    for name in names:
        for config in ("train.json", "multi_gpu_train.json"):
            with open(os.path.join(BUNDLES_DIR, name, "configs", config)) as f:
                content = json.load(f)
            assert not any("progress" in str(e).lower() for e in content.get("initialize", [])), (name, config)
        bars = [h for h in content_train(name)["train"]["handlers"] if "ProgressBar" in h["_target_"]]
        assert len(bars) == 1, (name, bars)
        targets.add(json.dumps(bars[0], sort_keys=True))
        assert "ProgressBar" not in json.dumps({k: v for k, v in content_train(name)["train"].items() if k != "handlers"})
    assert len(targets) == 1, targets


def content_train(name: str) -> dict:
    with open(os.path.join(BUNDLES_DIR, name, "configs", "train.json")) as f:
        return json.load(f)
