"""The eight HybridMIM finetuning bundles ``hybridmim_{swin,unet}_{btcv,msd_spleen,msd_liver,brats}``.

One builder, parameterised by task (:data:`TASKS`) and backbone (:data:`BACKBONES`), writes every file of a bundle, so
the eight are consistent by construction: same keys, same skeleton (model zoo layout: ``train.json`` with
``train#...``/``validate#...``; ``evaluate.json`` and ``multi_gpu_train.json`` layered on it; a standalone
``inference.json`` with the keys MONAI Label reads).
"""
from __future__ import annotations

import copy

from tools.bundles.bundlegen.common import (WORKFLOW, ADAMW, ATTACH_RANDOM_STATES, DDP_DEVICE, DDP_FINALIZE, DDP_NETWORK,
                                            DOWNSAMPLE, DOWNSAMPLE_REF, PRETRAINED_KEYS, USE_V2, RANDOM_STATES,
                                            RESUME_GUARANTEE, SAVER, load_pretrained_call, location_keys,
                                            metadata_header, preprocessing_record, provenance_recorder,
                                            public_weights_section, ATTACH_PROVENANCE, CHECK_TRAINED_SETTINGS,
                                            architecture_record, trained_settings_check)
from tools.bundles.bundlegen.dicom_segments import dicom_segments
from tools.bundles.bundlegen.figures import performance_section
from tools.bundles.bundlegen.identity import CHANGED_SETTINGS, loader_keys, run_identity, unless_resuming
from tools.bundles.bundlegen.onnx import onnx_files, readme_section as onnx_readme_section

__all__ = ["TASKS", "BACKBONES", "bundle_name", "bundles", "build_bundle"]

BTCV_CLASSES = (
    ("background", "background"),
    ("spleen", "spleen"),
    ("right kidney", "right_kidney"),
    ("left kidney", "left_kidney"),
    ("gallbladder", "gallbladder"),
    ("esophagus", "esophagus"),
    ("liver", "liver"),
    ("stomach", "stomach"),
    ("aorta", "aorta"),
    ("inferior vena cava", "ivc"),
    ("portal and splenic veins", "portal_splenic_veins"),
    ("pancreas", "pancreas"),
    ("right adrenal gland", "right_adrenal_gland"),
    ("left adrenal gland", "left_adrenal_gland"),
)

CT_DATA_NOTE = (
    "The datalist is built by `tools/data/prepare_datalist.py` of the HybridMIM Bundles repository (paths relative to "
    "`dataset_dir`)."
)

#: Per-task settings. ``classes``: (display name, metric-key slug), background first for softmax tasks; BraTS lists
#: its three sigmoid channels.
TASKS = {
    "btcv": {
        "title": "BTCV multi-organ segmentation",
        "modality": "CT",
        "in_channels": 1,
        "classes": BTCV_CLASSES,
        "sigmoid": False,
        "dataset_dir": "/workspace/data/BTCV",
        "max_epochs": 2000,
        "val_interval": 10,
        "roi": 96,
        "num_samples": 4,
        "cache_rate": 1.0,
        "pixdim": [1.5, 1.5, 2.0],
        "prepare": "python tools/data/prepare_datalist.py btcv /workspace/data/BTCV",
        "data_source": "BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, MICCAI 2015), "
        "https://www.synapse.org/#!Synapse:syn3193805/wiki/217752 (RawData.zip, Synapse registration)",
        "data_text": (
            "The Beyond the Cranial Vault (BTCV) abdomen challenge: 30 labelled portal-venous CT scans (13 organs) "
            "and 20 unlabelled test scans. Download `RawData.zip` from "
            "[Synapse](https://www.synapse.org/#!Synapse:syn3193805/wiki/217752) (free registration; accept the "
            "challenge's data terms), unpack it to `/workspace/data/BTCV` (`Training/img`, `Training/label`, "
            "`Testing/img`, or `imagesTr`/`labelsTr`/`imagesTs`). The default split is the one of the UNETR / "
            "SwinUNETR papers: validation = cases 0035-0040, training = the other 24."
        ),
        "paper": "BTCV, mean Dice over the 13 organs: HybridMIM (UNet, generic pretraining) 83.00 %; SwinUNETR "
        "trained from scratch 81.81 %.",
        "licence": (
            "BTCV (Multi-Atlas Labeling Beyond the Cranial Vault), MICCAI 2015 challenge\n"
            "    https://www.synapse.org/#!Synapse:syn3193805/wiki/217752\n\n"
            "The images and labels are distributed through Synapse under the challenge's data use terms, which each\n"
            "user accepts when downloading them (registration required). They are not redistributed with this bundle.\n"
            "Cite: Landman B, Xu Z, Igelsias JE, Styner M, Langerak TR, Klein A. MICCAI Multi-Atlas Labeling Beyond\n"
            "the Cranial Vault - Workshop and Challenge, 2015. doi:10.7303/syn3193805\n"
        ),
    },
    "msd_spleen": {
        "title": "MSD Task09 spleen segmentation",
        "modality": "CT",
        "in_channels": 1,
        "classes": (("background", "background"), ("spleen", "spleen")),
        "sigmoid": False,
        "dataset_dir": "/workspace/data/Task09_Spleen",
        "max_epochs": 600,
        "val_interval": 5,
        "roi": 96,
        "num_samples": 4,
        "cache_rate": 1.0,
        "pixdim": [1.5, 1.5, 2.0],
        "prepare": "python tools/data/prepare_datalist.py msd /workspace/data/Task09_Spleen --val_fraction 0.2",
        "data_source": "Medical Segmentation Decathlon Task09_Spleen, http://medicaldecathlon.com/",
        "data_text": (
            "Task09_Spleen of the [Medical Segmentation Decathlon](http://medicaldecathlon.com/): 41 labelled portal-"
            "venous CT scans (spleen) and 20 unlabelled test scans. Download `Task09_Spleen.tar` (e.g. from the "
            "Decathlon's Google Drive / AWS links, or `monai.apps.DecathlonDataset(..., task='Task09_Spleen', "
            "download=True)`) and unpack it to `/workspace/data/Task09_Spleen`. The datalist takes a seeded 20 % of "
            "the labelled cases for validation; its `testing` list is the task's test images."
        ),
        "paper": "MSD Spleen, Dice: HybridMIM 96.05 %.",
        "licence": (
            "Medical Segmentation Decathlon, Task09_Spleen\n    http://medicaldecathlon.com/\n\n"
            "The Decathlon data are released under the Creative Commons Attribution-ShareAlike 4.0 International\n"
            "licence (CC BY-SA 4.0), https://creativecommons.org/licenses/by-sa/4.0/\n"
            "Cite: Antonelli M, et al. The Medical Segmentation Decathlon. Nature Communications 13, 4128 (2022).\n"
            "Simpson AL, et al. A large annotated medical image dataset for the development and evaluation of\n"
            "segmentation algorithms. arXiv:1902.09063 (2019).\n"
        ),
    },
    "msd_liver": {
        "title": "MSD Task03 liver and liver tumour segmentation",
        "modality": "CT",
        "in_channels": 1,
        "classes": (("background", "background"), ("liver", "liver"), ("tumour", "tumour")),
        "sigmoid": False,
        "dataset_dir": "/workspace/data/Task03_Liver",
        "max_epochs": 600,
        "val_interval": 5,
        "roi": 96,
        "num_samples": 4,
        "cache_rate": 1.0,
        "pixdim": [1.5, 1.5, 2.0],
        "prepare": "python tools/data/prepare_datalist.py msd /workspace/data/Task03_Liver --val_fraction 0.2",
        "data_source": "Medical Segmentation Decathlon Task03_Liver, http://medicaldecathlon.com/",
        "data_text": (
            "Task03_Liver of the [Medical Segmentation Decathlon](http://medicaldecathlon.com/) (LiTS): 131 labelled "
            "portal-venous CT scans (liver, tumour) and 70 unlabelled test scans. Download `Task03_Liver.tar` and "
            "unpack it to `/workspace/data/Task03_Liver`. The datalist takes a seeded 20 % of the labelled cases for "
            "validation; its `testing` list is the task's test images. The volumes are large: `cache_rate` 1.0 "
            "needs about 60 GB of memory after resampling; lower it if needed."
        ),
        "paper": "MSD Liver, average Dice over liver and tumour: HybridMIM 74.36 %.",
        "licence": (
            "Medical Segmentation Decathlon, Task03_Liver (from the LiTS challenge)\n    http://medicaldecathlon.com/\n\n"
            "The Decathlon data are released under the Creative Commons Attribution-ShareAlike 4.0 International\n"
            "licence (CC BY-SA 4.0), https://creativecommons.org/licenses/by-sa/4.0/\n"
            "Cite: Antonelli M, et al. The Medical Segmentation Decathlon. Nature Communications 13, 4128 (2022).\n"
            "Bilic P, et al. The Liver Tumor Segmentation Benchmark (LiTS). Medical Image Analysis 84, 102680 (2023).\n"
        ),
    },
    "brats": {
        "title": "BraTS2020 brain tumour segmentation (TC, WT, ET)",
        "modality": "MR",
        "in_channels": 4,
        "classes": (("TC", "tc"), ("WT", "wt"), ("ET", "et")),
        "sigmoid": True,
        "dataset_dir": "/workspace/data/BraTS2020",
        "max_epochs": 300,
        "val_interval": 5,
        "roi": 128,
        "num_samples": 2,
        "cache_rate": 0.0,
        "pixdim": [1.0, 1.0, 1.0],
        "prepare": "python tools/data/prepare_datalist.py brats /workspace/data/BraTS2020 --val_fraction 0.2",
        "data_source": "BraTS 2020 (Multimodal Brain Tumor Segmentation Challenge), "
        "https://www.med.upenn.edu/cbica/brats2020/data.html",
        "data_text": (
            "The [BraTS 2020](https://www.med.upenn.edu/cbica/brats2020/data.html) training data: 369 cases, each "
            "with four co-registered 1 mm MRI sequences (T1, T1ce, T2, FLAIR) and a label map (1 necrotic/non-"
            "enhancing tumour core, 2 peritumoural oedema, 4 enhancing tumour). Register with the challenge (CBICA "
            "IPP) to download `MICCAI_BraTS2020_TrainingData` (and optionally `MICCAI_BraTS2020_ValidationData`, "
            "no labels) into `/workspace/data/BraTS2020`. The datalist stacks the four sequences in the order t1, "
            "t1ce, t2, flair and takes a seeded 20 % of the training cases for validation. The network predicts the "
            "three nested regions as sigmoid channels: tumour core (TC = 1 + 4), whole tumour (WT = 1 + 2 + 4) and "
            "enhancing tumour (ET = 4)."
        ),
        "paper": "BraTS2020, mean Dice over TC/WT/ET: HybridMIM* (SwinUNETR, task-specific pretraining) 86.39 %; "
        "SwinUNETR from scratch 85.09 %.",
        "licence": (
            "Multimodal Brain Tumor Segmentation Challenge 2020 (BraTS 2020)\n"
            "    https://www.med.upenn.edu/cbica/brats2020/data.html\n\n"
            "Data usage agreement: the BraTS data may be used for research provided that the following are cited.\n"
            "They are not redistributed with this bundle.\n"
            "[1] Menze BH, et al. The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS). IEEE TMI 34(10),\n"
            "    1993-2024 (2015). doi:10.1109/TMI.2014.2377694\n"
            "[2] Bakas S, et al. Advancing The Cancer Genome Atlas glioma MRI collections with expert segmentation\n"
            "    labels and radiomic features. Nature Scientific Data 4, 170117 (2017). doi:10.1038/sdata.2017.117\n"
            "[3] Bakas S, Reyes M, Jakab A, et al. Identifying the Best Machine Learning Algorithms for Brain Tumor\n"
            "    Segmentation, Progression Assessment, and Overall Survival Prediction in the BRATS Challenge.\n"
            "    arXiv:1811.02629 (2018).\n"
            "[4] Bakas S, et al. Segmentation Labels and Radiomic Features for the Pre-operative Scans of the\n"
            "    TCGA-GBM collection. The Cancer Imaging Archive (2017). doi:10.7937/K9/TCIA.2017.KLXWJJ1Q\n"
            "[5] Bakas S, et al. Segmentation Labels and Radiomic Features for the Pre-operative Scans of the\n"
            "    TCGA-LGG collection. The Cancer Imaging Archive (2017). doi:10.7937/K9/TCIA.2017.GJQ7R0EF\n"
        ),
    },
}

#: Per-backbone settings: the network and its width key (the only override needed to shrink it).
BACKBONES = {
    "swin": {
        "title": "SwinUNETR",
        "width_key": "feature_size",
        "width": 48,
        "last_layer": "out.*",
        "roi_multiple": 32,  # SwinUNETR down-samples 5 times
    },
    "unet": {
        "title": "UNet (MONAI BasicUNet)",
        "width_key": "features",
        "width": [32, 32, 64, 128, 256, 32],
        "last_layer": "final_conv.*",
        "roi_multiple": 16,  # BasicUNet down-samples 4 times
    },
}

SCIPY_VERSION = "1.17.1"
FROM_LOSS = "$monai.handlers.from_engine(['loss'], first=True)"
SEED = 123
# under torchrun every rank draws its own crops and augmentations: seed + global rank (RANK, set by torchrun)
RANK_SEED = "@seed + int(os.environ.get('RANK', '0'))"
# one progress bar (with the loss) for both bundle families, listed in train#handlers
PROGRESS_BAR = {"_target_": "hybridmim_components.workflow.TrainProgressBar"}
FULL_CHECKPOINT = {"model": "@network", "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler",
                   "trainer": "@train#trainer", "best_validation": "@train#best_validation",
                   "grad_scaler": "@train#grad_scaler", "random_states": "@train#random_states"}


def bundle_name(backbone: str, task: str) -> str:
    return f"hybridmim_{backbone}_{task}"


def pretrain_bundle(backbone: str, task: str) -> str:
    return f"hybridmim_{backbone}_pretrain" + ("_brats" if task == "brats" else "")


# ----------------------------------------------------------------------------------------------------------- pieces
def _network_def(backbone: str, task: str, inference: bool = False) -> dict:
    t = TASKS[task]
    out_channels = len(t["classes"])
    if backbone == "swin":
        return {
            "_target_": "monai.networks.nets.SwinUNETR",
            "in_channels": t["in_channels"],
            "out_channels": out_channels,
            "feature_size": "@feature_size",
            "drop_rate": 0.0,
            "use_checkpoint": False if inference else "@use_checkpoint",
            "downsample": DOWNSAMPLE_REF,
            "use_v2": "@use_v2",
        }
    return {
        "_target_": "monai.networks.nets.BasicUNet",
        "spatial_dims": 3,
        "in_channels": t["in_channels"],
        "out_channels": out_channels,
        "features": "@features",
        "dropout": 0.0,
    }


def _backbone_class(backbone: str) -> str:
    return "SwinUNETR" if backbone == "swin" else "BasicUNet"


def _trained_settings_keys(backbone: str) -> dict:
    """Keys of every config that loads the trained ``models/model.pt`` (inference, evaluate): the network in the
    record's fields and the check of both against ``models/model.provenance.json``
    (``hybridmim_components.weights.trained_settings``), evaluated as the ``_requires_`` of ``network_def``."""
    return {
        "check_trained_settings": CHECK_TRAINED_SETTINGS,
        "architecture_record": architecture_record(_backbone_class(backbone), backbone == "swin"),
        "trained_settings_check": trained_settings_check(),
    }


def _intensity(task: str, keys="image") -> list[dict]:
    """Intensity normalisation: CT window (the pretraining bundles' one) or MRI z-score inside the brain."""
    if TASKS[task]["modality"] == "CT":
        return [
            {
                "_target_": "ScaleIntensityRanged",
                "keys": keys,
                "a_min": "@a_min",
                "a_max": "@a_max",
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            }
        ]
    # not MONAI's NormalizeIntensityd: invertible since MONAI 1.7 (PR #8905), so Invertd would de-normalise the
    # predicted probabilities (hybridmim_components/workflow/intensity.py)
    return [{"_target_": "hybridmim_components.workflow.NonInvertibleNormalizeIntensityd", "keys": keys,
             "nonzero": True, "channel_wise": True}]


def _load_transforms(task: str, with_label: bool, keep_original_label: bool = False) -> list[dict]:
    """Load, channel first (BraTS: 4 files stacked as channels; label to TC/WT/ET)."""
    keys = ["image", "label"] if with_label else ["image"]
    loads = [{"_target_": "LoadImaged", "keys": keys, "image_only": True}]
    if keep_original_label:
        # evaluate.json: an untouched copy of the label, to measure at the original resolution
        loads.append({"_target_": "CopyItemsd", "keys": "label", "names": "original_label"})
        keys = keys + ["original_label"]
    loads.append({"_target_": "EnsureChannelFirstd", "keys": keys})
    if task == "brats" and with_label:
        loads.append(
            {"_target_": "ConvertToMultiChannelBasedOnBratsClassesd", "keys": [k for k in keys if k != "image"]}
        )
    return loads


def _deterministic_transforms(task: str, with_label: bool = True, keep_original_label: bool = False) -> list[dict]:
    keys = ["image", "label"] if with_label else "image"
    mode = ["bilinear", "nearest"] if with_label else "bilinear"
    tr = _load_transforms(task, with_label, keep_original_label)
    tr += [
        {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": keys, "pixdim": "@pixdim", "mode": mode},
    ]
    crop = {"_target_": "CropForegroundd", "keys": keys, "source_key": "image", "allow_smaller": True}
    if TASKS[task]["modality"] == "CT":
        tr += _intensity(task) + [crop]  # after the window, air is 0: the foreground is the body
    else:
        tr += [crop] + _intensity(task)  # before the z-score, outside the brain is 0
    if with_label:
        tr.append({"_target_": "SpatialPadd", "keys": keys, "spatial_size": "@roi_size"})
    tr.append({"_target_": "EnsureTyped", "keys": keys})
    return tr


def _random_transforms() -> list[dict]:
    keys = ["image", "label"]
    tr = [
        {
            "_target_": "RandCropByPosNegLabeld",
            "keys": keys,
            "label_key": "label",
            "spatial_size": "@roi_size",
            "pos": 1,
            "neg": 1,
            "num_samples": "@num_samples",
            "image_key": "image",
            "image_threshold": 0,
        }
    ]
    # the paper's light augmentation: flips and 90 degree rotations with probability 0.2, intensity scale and shift
    # by up to 10 % with probability 0.1
    tr += [{"_target_": "RandFlipd", "keys": keys, "spatial_axis": [axis], "prob": 0.2} for axis in range(3)]
    tr += [
        {"_target_": "RandRotate90d", "keys": keys, "max_k": 3, "prob": 0.2},
        {"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": 0.1},
        {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": 0.1},
    ]
    return tr


def _slugs(task: str) -> list[str]:
    return [slug for _, slug in TASKS[task]["classes"]]


def _scored_slugs(task: str) -> list[str]:
    """Classes with a Dice score: all sigmoid channels, every softmax class but the background."""
    slugs = _slugs(task)
    return slugs if TASKS[task]["sigmoid"] else slugs[1:]


def _val_postprocessing(task: str, label_key: str = "label", invert: bool = False) -> dict:
    """Discretise (and, for ``evaluate.json``, first invert the preprocessing), then one channel per class."""
    t = TASKS[task]
    n = len(t["classes"])
    tr = [{"_target_": "Activationsd", "keys": "pred", **({"sigmoid": True} if t["sigmoid"] else {"softmax": True})}]
    if invert:
        # evaluate.json: the untouched label (a batch key) copied to a new key, so that it reaches the engine output
        tr.append({"_target_": "CopyItemsd", "keys": "original_label", "names": label_key})
        tr.append(
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@validate#preprocessing",
                "orig_keys": "image",
                "nearest_interp": False,
                "to_tensor": True,
            }
        )
    if t["sigmoid"]:
        tr.append({"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5})
    else:
        tr.append(
            {"_target_": "AsDiscreted", "keys": ["pred", label_key], "argmax": [True, False], "to_onehot": [n, n]}
        )
    if invert:
        tr.append(_save_evaluated_segmentation(task))
    # per-class Dice: pred_<class>, <label_key>_<class> (one channel each)
    tr.append(
        {
            "_target_": "SplitDimd",
            "keys": ["pred", label_key],
            "output_postfixes": _slugs(task),
            "dim": 0,
            "keepdim": True,
            "update_meta": False,
        }
    )
    return {"_target_": "Compose", "transforms": tr}


def _label_map_saver(key: str) -> dict:
    """``SaveImaged`` of a label map at the input's geometry: ``<image name>_seg.nii.gz`` in ``output_dir``."""
    return {
        "_target_": "SaveImaged",
        "keys": key,
        "output_dir": "@output_dir",
        "output_postfix": "seg",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.uint8",
        "resample": False,
        "separate_folder": False,
        "print_log": True,
    }


def _save_evaluated_segmentation(task: str) -> dict:
    """evaluate.json: each validation case's label map (as inference.json writes it), from the discretised ``pred``
    already inverted to the input grid, so it overlays the input image; off with ``save_predictions`` false."""
    to_label_map = (
        {"_target_": "hybridmim_components.workflow.BratsClassesToLabelMapd", "keys": "seg"}
        if TASKS[task]["sigmoid"]
        else {"_target_": "AsDiscreted", "keys": "seg", "argmax": True}  # one-hot -> label values
    )
    return {
        "_target_": "Compose",
        "_disabled_": "$not hybridmim_components.workflow.config_flag(@save_predictions, 'save_predictions')",
        "transforms": [
            {"_target_": "CopyItemsd", "keys": "pred", "names": "seg"},
            to_label_map,
            _label_map_saver("seg"),
            {"_target_": "DeleteItemsd", "keys": "seg"},
        ],
    }


def _per_class_metrics(task: str, label_key: str, prefix: str, target: str, extra: dict | None = None) -> dict:
    metrics = {}
    for slug in _scored_slugs(task):
        metrics[f"{prefix}_{slug}"] = {
            "_target_": target,
            "include_background": True,
            "output_transform": f"$monai.handlers.from_engine(['pred_{slug}', '{label_key}_{slug}'])",
            **(extra or {}),
        }
    return metrics


def _mean_dice(task: str, label_key: str) -> dict:
    return {
        "_target_": "MeanDice",
        "include_background": TASKS[task]["sigmoid"],
        "output_transform": f"$monai.handlers.from_engine(['pred', '{label_key}'])",
    }


# ------------------------------------------------------------------------------------------------------ the configs
def train_config(backbone: str, task: str) -> dict:
    t, b = TASKS[task], BACKBONES[backbone]
    roi = [t["roi"]] * 3
    cfg: dict = {
        "imports": ["$import os", "$import torch", "$import hybridmim_components",
                    "$import hybridmim_components.workflow"],
        **location_keys(t["dataset_dir"]),
        "pretrained_path": f"$@bundle_root + '/../{pretrain_bundle(backbone, task)}/models/model.pt'",
        **PRETRAINED_KEYS,
        "label_fraction": 1.0,
        "resume": False,
        # continue a checkpoint of another run (other settings) on purpose; false: only this run's are resumed
        **CHANGED_SETTINGS,
        "seed": SEED,
        # read every image and label of the datalist once before caching (corrupt files, channels, label values,
        # NaN/inf); false skips the scan
        "check_data": True,
        # stop after this many iterations in a row with a NaN/inf loss (their optimizer steps are skipped)
        "max_nonfinite_steps": 20,
        "amp": True,
        # autocast dtype with amp on (MONAI's default float16; bfloat16 on Ampere and newer needs no loss scaling)
        "amp_dtype": "float16",
        "roi_size": roi,
        "pixdim": t["pixdim"],
    }
    if t["modality"] == "CT":
        cfg.update({"a_min": -1000.0, "a_max": 1000.0})
    cfg[b["width_key"]] = b["width"]
    if backbone == "swin":
        cfg["downsample"] = DOWNSAMPLE  # patch-merging order; "merging_legacy" for weights trained on MONAI <= 1.4
        cfg["use_v2"] = USE_V2
    if backbone == "swin":
        cfg["use_checkpoint"] = True
    # this bundle's preprocessing, compared with the record the pretrained weights come with
    cfg["preprocessing_record"] = preprocessing_record(t["modality"] == "CT")
    cfg.update(
        {
            "num_samples": t["num_samples"],
            "cache_rate": t["cache_rate"],
            "val_interval": t["val_interval"],
            "learning_rate": 1e-4,
            "weight_decay": 1e-5,
            "warmup_epochs": 50,
            "network_def": _network_def(backbone, task),
            "network": "$@network_def.to(@device)",
            "loss": (
                {"_target_": "DiceLoss", "sigmoid": True, "squared_pred": True, "smooth_nr": 0.0, "smooth_dr": 1e-5}
                if t["sigmoid"]
                else {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True, "squared_pred": True,
                      "smooth_nr": 0.0, "smooth_dr": 1e-6}
            ),
            "optimizer": dict(ADAMW),
            # linear warm-up over warmup_epochs, then cosine decay to 0 at max_epochs; stepped every iteration
            "lr_scheduler": {
                "_target_": "monai.optimizers.WarmupCosineSchedule",
                "optimizer": "@optimizer",
                "warmup_steps": "$@warmup_epochs * len(@train#dataloader)",
                "t_total": "$@train#trainer#max_epochs * len(@train#dataloader)",
            },
        }
    )
    dl_workers = 4
    cfg["train"] = {
        "deterministic_transforms": _deterministic_transforms(task),
        "random_transforms": _random_transforms(),
        "preprocessing": {
            "_target_": "Compose",
            "transforms": "$@train#deterministic_transforms + @train#random_transforms",
        },
        "dataset": {
            "_target_": "CacheDataset",
            "data": "$hybridmim_components.workflow.load_datalist(@dataset_dir, @data_list_file_path, 'training', "
            "label_fraction=@label_fraction, required_keys=('image', 'label'))",
            "transform": "@train#preprocessing",
            "cache_rate": "@cache_rate",
            "num_workers": "@train#dataloader#num_workers",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@train#dataset",
            "batch_size": 1,
            "shuffle": True,
            "num_workers": dl_workers,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "handlers": [
            {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "epoch_level": False,
             "print_lr": False},
            {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
             "interval": "@val_interval"},
            {"_target_": "StatsHandler", "tag_name": "train_loss", "output_transform": FROM_LOSS},
            {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "tag_name": "train_loss",
             "output_transform": FROM_LOSS},
            dict(PROGRESS_BAR),
        ],
        "trainer": {
            "_target_": "SupervisedTrainer",
            "max_epochs": t["max_epochs"],
            "device": "@device",
            "train_data_loader": "@train#dataloader",
            "network": "@network",
            "loss_function": "@loss",
            "optimizer": "@optimizer",
            "inferer": "@train#inferer",
            "train_handlers": "@train#handlers",
            "amp": "$hybridmim_components.workflow.config_flag(@amp, 'amp')",
            "amp_kwargs": "$hybridmim_components.workflow.amp_kwargs(@amp_dtype)",
        },
        # full checkpoint (network, optimiser, scheduler, trainer state, best validation) for `resume`; it
        # references the trainer, so it is attached in `initialize` rather than listed in train#handlers
        "checkpoint_saver": {
            "_target_": SAVER,
            "save_dir": "@ckpt_dir",
            "save_dict": {**FULL_CHECKPOINT, "run_identity": "@train#run_identity"},
            "file_prefix": "",
            "save_interval": "@val_interval",
            "n_saved": 1,
            "save_final": True,
            "final_filename": "checkpoint_final.pt",
        },
        "checkpoint_loader": {
            "_target_": f"{WORKFLOW}.ResumeFromLatestCheckpoint",
            "ckpt_dir": "@ckpt_dir",
            "load_dict": dict(FULL_CHECKPOINT),
            "enabled": "$hybridmim_components.workflow.config_flag(@resume, 'resume')",
            "map_location": "@device",
            **loader_keys(),
        },
        # what makes this run this run (saved in every full checkpoint; resume continues only the same)
        "run_identity": run_identity(
            "$hybridmim_components.workflow.datalist_identity(@dataset_dir, @data_list_file_path, "
            "label_fraction=@label_fraction)",
            cfg["network_def"], cfg["loss"], cfg["optimizer"],
            {"seed": "@seed", "preprocessing": "@preprocessing_record", "num_samples": "@num_samples",
             "batch_size": "@train#dataloader#batch_size", "warmup_epochs": "@warmup_epochs"}),
    }
    cfg["validate"] = {
        "preprocessing": {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
        "dataset": {
            "_target_": "CacheDataset",
            "data": "$hybridmim_components.workflow.load_datalist(@dataset_dir, @data_list_file_path, 'validation', "
            "required_keys=('image', 'label'))",
            "transform": "@validate#preprocessing",
            "cache_rate": "@cache_rate",
            "num_workers": "@train#dataloader#num_workers",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@validate#dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": "@train#dataloader#num_workers",
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi_size", "sw_batch_size": 4, "overlap": 0.5},
        "postprocessing": _val_postprocessing(task),
        "handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
            {"_target_": SAVER, "save_dir": "@ckpt_dir", "save_dict": {"model": "@network"},
             "save_key_metric": True, "key_metric_filename": "model.pt"},
        ],
        "key_metric": {"val_mean_dice": _mean_dice(task, "label")},
        "additional_metrics": _per_class_metrics(task, "label", "val_dice", "MeanDice"),
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@validate#dataloader",
            "network": "@network",
            "inferer": "@validate#inferer",
            "postprocessing": "@validate#postprocessing",
            "key_val_metric": "@validate#key_metric",
            "additional_metrics": "@validate#additional_metrics",
            "val_handlers": "@validate#handlers",
            "amp": "$hybridmim_components.workflow.config_flag(@amp, 'amp')",
            "amp_kwargs": "$hybridmim_components.workflow.amp_kwargs(@amp_dtype)",
        },
    }
    # best val_mean_dice so far and the best-model saver's record, kept in the full checkpoint so that a resumed
    # run replaces models/model.pt only with a better model
    cfg["train"]["best_validation"] = {
        "_target_": f"{WORKFLOW}.BestMetricState",
        "evaluator": "@validate#evaluator",
        "savers": [f"@validate#handlers#{i}" for i, h in enumerate(cfg["validate"]["handlers"])
                   if h["_target_"] == SAVER],
    }
    # the AMP loss scale (trainer.scaler, created by trainer.run() when amp is on), kept in the full checkpoint so
    # that a resumed run does not calibrate it again
    cfg["train"]["grad_scaler"] = {"_target_": f"{WORKFLOW}.GradScalerState", "trainer": "@train#trainer"}
    cfg["train"]["random_states"] = dict(RANDOM_STATES)
    # skips the optimizer step of a NaN/inf loss, logs it, stops after max_nonfinite_steps in a row (attached in
    # `initialize`: it references the trainer's optimizer)
    cfg["train"]["nonfinite_guard"] = {"_target_": "hybridmim_components.workflow.NonFiniteLossGuard",
                                       "max_nonfinite_steps": "@max_nonfinite_steps"}
    # models/model.provenance.json beside the best model: what it was trained with (it may seed another finetune)
    cfg["train"]["provenance"] = provenance_recorder(
        _backbone_class(backbone), backbone == "swin", "@network_def#in_channels",
        bundle_name(backbone, task), out_channels="@network_def#out_channels")
    cfg["initialize"] = [
        # seeded first: the network is built (lazily) by the first entry that references it
        "$monai.utils.set_determinism(seed=@seed)",
        f"$hybridmim_components.workflow.check_roi_size(@roi_size, {b['roi_multiple']})",
        *_data_check_initialize(task),
        # backbone weights of the pretraining bundle (encoder and decoder; only the last layer starts from scratch);
        # the loader logs its report and stops on weights that do not fit
        unless_resuming(load_pretrained_call("@network_def")),
        ATTACH_RANDOM_STATES,
        ATTACH_PROVENANCE,
        "$@train#checkpoint_saver.attach(@train#trainer)",
        "$@train#checkpoint_loader.attach(@train#trainer)",
        "$@train#nonfinite_guard.attach(@train#trainer)",
    ]
    cfg["run"] = ["$@train#trainer.run()"]
    return cfg


def _data_check_initialize(task: str) -> list[str]:
    """`initialize` entries that read every datalist file before any is cached (label values: the task's classes)."""
    labels = [0, 1, 2, 4] if task == "brats" else list(range(len(TASKS[task]["classes"])))
    return [
        "$hybridmim_components.workflow.check_datalist(@dataset_dir, @data_list_file_path, "
        f"('training', 'validation'), image_channels=@network_def#in_channels, label_values={labels}, "
        "required_keys=('image', 'label'), label_fraction=@label_fraction, enabled=@check_data)",
    ]


def evaluate_config(backbone: str, task: str) -> dict:
    t = TASKS[task]
    hd = {"_target_": "hybridmim_components.workflow.HausdorffDistance95", "percentile": 95.0}
    additional = {
        "val_mean_hd95": {
            **hd,
            "include_background": t["sigmoid"],
            "output_transform": "$monai.handlers.from_engine(['pred', 'reference'])",
        }
    }
    additional.update(_per_class_metrics(task, "reference", "val_dice", "MeanDice"))
    additional.update(_per_class_metrics(task, "reference", "val_hd95", hd["_target_"], {"percentile": 95.0}))
    return {
        # the trained model.pt is loaded into train.json's network_def: first its settings are checked against the
        # weights' record (merging order, width, spacing, window), so that it computes what it computed in training
        **_trained_settings_keys(backbone),
        "network_def#_requires_": "@trained_settings_check",
        # one label map per validation case (<image name>_seg.nii.gz in output_dir, the input's geometry)
        "save_predictions": True,
        "validate#preprocessing": {
            "_target_": "Compose",
            "transforms": _deterministic_transforms(task, keep_original_label=True),
        },
        "validate#postprocessing": _val_postprocessing(task, label_key="reference", invert=True),
        "validate#key_metric": {"val_mean_dice": _mean_dice(task, "reference")},
        "validate#additional_metrics": additional,
        "validate#handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@ckpt_dir + '/model.pt'", "load_dict": {"model": "@network"},
             "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
            {
                "_target_": "MetricsSaver",
                "save_dir": "@output_dir",
                "metrics": "*",
                "metric_details": ["val_mean_dice", "val_mean_hd95"],
                "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
                "summary_ops": "*",
                "delimiter": ",",
            },
        ],
        "initialize": ["$monai.utils.set_determinism(seed=@seed)"],
        "run": ["$@validate#evaluator.run()"],
    }


def multi_gpu_config(backbone: str, task: str) -> dict:
    # rank 0 alone logs (console, TensorBoard, progress bar) and saves
    rank0_train = [i for i, h in enumerate(train_config(backbone, task)["train"]["handlers"])
                   if h["_target_"] in ("StatsHandler", "TensorBoardStatsHandler", PROGRESS_BAR["_target_"])]
    return {
        "device": DDP_DEVICE,
        "network": dict(DDP_NETWORK),
        # each process caches only its share of the lists (not every volume on every rank): training shards of
        # equal length (seeded shuffle), validation split as a DistributedSampler without shuffle would split it
        "train#dataset#data": "$hybridmim_components.workflow.partition_for_rank(hybridmim_components.workflow.load_datalist("
        "@dataset_dir, @data_list_file_path, 'training', label_fraction=@label_fraction, "
        "required_keys=('image', 'label')), shuffle=True, seed=" + str(SEED) + ", even_divisible=True, "
        "what='training list')",
        **{f"train#handlers#{i}#_disabled_": "$dist.get_rank() > 0" for i in rank0_train},
        "validate#dataset#data": "$hybridmim_components.workflow.partition_for_rank(hybridmim_components.workflow."
        "load_datalist(@dataset_dir, @data_list_file_path, 'validation', required_keys=('image', 'label')), "
        "what='validation list')",
        "validate#evaluator#val_handlers": "$None if dist.get_rank() > 0 else @validate#handlers",
        "initialize": [
            "$import torch.distributed as dist",
            "$dist.is_initialized() or dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')",
            "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
            # seeded before the network is built; a different random stream per rank (crops, augmentations)
            f"$monai.utils.set_determinism(seed={RANK_SEED})",
            f"$hybridmim_components.workflow.check_roi_size(@roi_size, {BACKBONES[backbone]['roi_multiple']})",
            *_data_check_initialize(task),
            unless_resuming(load_pretrained_call("@network_def")),
            ATTACH_RANDOM_STATES,
            ATTACH_PROVENANCE,
            "$@train#checkpoint_saver.attach(@train#trainer) if dist.get_rank() == 0 else None",
            "$@train#checkpoint_loader.attach(@train#trainer)",
            "$@train#nonfinite_guard.attach(@train#trainer)",
        ],
        "run": ["$@train#trainer.run()"],
        "finalize": list(DDP_FINALIZE),
    }


def _serving_transforms(transforms: list[dict]) -> list[dict]:
    """inference.json: ``Spacingd`` -> ``PathSafeSpacingd``, which MONAI Label serves on MONAI 1.6 too (MONAI 1.6's
    ``Spacingd`` updates every ``image_*`` entry and fails on MONAI Label's ``image_path`` string)."""
    return [{**t, "_target_": "hybridmim_components.workflow.PathSafeSpacingd"} if t["_target_"] == "Spacingd" else t
            for t in transforms]


def inference_config(backbone: str, task: str) -> dict:
    t, b = TASKS[task], BACKBONES[backbone]
    cfg: dict = {
        "imports": ["$import os", "$import torch", "$import hybridmim_components",
                    "$import hybridmim_components.workflow"],
        **location_keys(t["dataset_dir"]),
        "amp": True,
        "amp_dtype": "float16",
        "roi_size": [t["roi"]] * 3,
        "pixdim": t["pixdim"],
    }
    if t["modality"] == "CT":
        cfg.update({"a_min": -1000.0, "a_max": 1000.0})
    cfg[b["width_key"]] = b["width"]
    if backbone == "swin":
        cfg["downsample"] = DOWNSAMPLE  # patch-merging order; "merging_legacy" for weights trained on MONAI <= 1.4
        cfg["use_v2"] = USE_V2
    post = [{"_target_": "Activationsd", "keys": "pred", **({"sigmoid": True} if t["sigmoid"] else {"softmax": True})},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True}]
    if t["sigmoid"]:
        post += [{"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
                 {"_target_": "hybridmim_components.workflow.BratsClassesToLabelMapd", "keys": "pred"}]
    else:
        post.append({"_target_": "AsDiscreted", "keys": "pred", "argmax": True})
    post.append(_label_map_saver("pred"))
    cfg["preprocessing_record"] = preprocessing_record(t["modality"] == "CT")
    cfg.update(_trained_settings_keys(backbone))
    cfg.update(
        {
            # _requires_: the check runs whenever network_def is built (this config, MONAI Label, onnx_export)
            "network_def": {**_network_def(backbone, task, inference=True), "_requires_": "@trained_settings_check"},
            "network": "$@network_def.to(@device)",
            "datalist": "$hybridmim_components.workflow.load_datalist(@dataset_dir, @data_list_file_path, 'testing')",
            "preprocessing": {
                "_target_": "Compose",
                "transforms": _serving_transforms(_deterministic_transforms(task, with_label=False)),
            },
            "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                           "num_workers": 4},
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi_size", "sw_batch_size": 4,
                        "overlap": 0.5},
            "postprocessing": {"_target_": "Compose", "transforms": post},
            "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
            "evaluator": {
                "_target_": "SupervisedEvaluator",
                "device": "@device",
                "val_data_loader": "@dataloader",
                "network": "@network",
                "inferer": "@inferer",
                "postprocessing": "@postprocessing",
                "val_handlers": "@handlers",
                "amp": "$hybridmim_components.workflow.config_flag(@amp, 'amp')",
                "amp_kwargs": "$hybridmim_components.workflow.amp_kwargs(@amp_dtype)",
            },
            "checkpointloader": {
                "_target_": "CheckpointLoader",
                "load_path": "$@ckpt_dir + '/model.pt'",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            "initialize": [f"$monai.utils.set_determinism(seed={SEED})", "$@checkpointloader(@evaluator)"],
            "run": ["$@evaluator.run()"],
        }
    )
    return cfg


def metadata(backbone: str, task: str) -> dict:
    t, b = TASKS[task], BACKBONES[backbone]
    names = [name for name, _ in t["classes"]]
    n = len(names)
    ct = t["modality"] == "CT"
    meta = metadata_header(
        description=(
            f"{b['title']} finetuned for {t['title']} from HybridMIM self-supervised pretraining (hybrid masked "
            f"image modeling: partial-region reconstruction, mask number/location prediction, dropout contrastive "
            f"learning). Starts from the backbone weights of the {pretrain_bundle(backbone, task)} bundle (encoder "
            f"and decoder; only the last layer is new) or from scratch."
        ),
        task=f"{t['title']} ({b['title']}, HybridMIM finetuning)",
    )
    if ct:
        image_classes = "single-channel CT, HU windowed -1000..1000 and scaled to [0, 1]"
        channel_in = {"0": "image"}
        label_classes = "single-channel label map, " + ", ".join(f"{i}: {c}" for i, c in enumerate(names))
        pred_classes = f"{n} channels (softmax), " + ", ".join(f"{i}: {c}" for i, c in enumerate(names))
        post_def = {str(i): c for i, c in enumerate(names)}
    else:
        image_classes = "4 channels: T1, T1ce, T2, FLAIR MRI (1 mm), z-score normalised inside the brain"
        channel_in = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
        label_classes = ("BraTS label map (1 necrotic/non-enhancing tumour core, 2 peritumoral oedema, 4 enhancing "
                         "tumour) converted to 3 channels: 0 TC, 1 WT, 2 ET")
        pred_classes = "3 sigmoid channels: 0 TC (tumour core), 1 WT (whole tumour), 2 ET (enhancing tumour)"
        post_def = {"0": "background", "1": "necrotic and non-enhancing tumour core", "2": "peritumoral oedema",
                    "4": "enhancing tumour"}
    # SwinUNETR: multiples of 32, at least 64 (a 32^3 input leaves a 1-voxel bottleneck that instance norm rejects)
    shape = ["32*(n+1)"] * 3 if backbone == "swin" else ["32*n"] * 3
    # evaluate.json's Hausdorff distance uses scipy.ndimage on CPU
    meta["required_packages_version"]["scipy"] = SCIPY_VERSION
    meta.update(
        {
            "data_source": t["data_source"],
            "data_type": "nibabel",
            "image_classes": image_classes,
            "label_classes": label_classes,
            "pred_classes": pred_classes,
            "intended_use": "Research only: not for clinical or diagnostic use.",
            "references": REFERENCES,
            # each value of the post-processed label map as a DICOM SEG segment (name, SNOMED CT codes, colour):
            # what a label saved back to a PACS is called there (docs/pacs.md)
            "dicom_segments": dicom_segments(post_def),
            "network_data_format": {
                "inputs": {
                    "image": {
                        "type": "image",
                        "format": "hounsfield" if ct else "magnitude",
                        "modality": t["modality"],
                        "num_channels": t["in_channels"],
                        "spatial_shape": shape,
                        "dtype": "float32",
                        "value_range": [0, 1] if ct else [],
                        "is_patch_data": True,
                        "channel_def": channel_in,
                    }
                },
                "outputs": {
                    "pred": {
                        "type": "image",
                        "format": "segmentation",
                        "num_channels": n,
                        "spatial_shape": shape,
                        "dtype": "float32",
                        "value_range": [0, 1],
                        "is_patch_data": True,
                        # MONAI Label names the values of the label map it receives after `postprocessing` with
                        # this channel_def (name -> int(key)): BraTS writes 1/2/4, not the TC/WT/ET channels
                        "channel_def": post_def,
                    }
                },
                "post_processed_outputs": {
                    "pred": {
                        "type": "image",
                        "format": "labels",
                        "num_channels": 1,
                        "spatial_shape": ["*", "*", "*"],
                        "dtype": "uint8",
                        "value_range": [0, max(int(k) for k in post_def)],
                        "is_patch_data": False,
                        "channel_def": post_def,
                    }
                },
            },
        }
    )
    return meta


REFERENCES = [
    "Xing Z, Zhu L, Yu L, Xing Z, Wan L. Hybrid Masked Image Modeling for 3D Medical Image Segmentation. "
    "IEEE Journal of Biomedical and Health Informatics (2024). arXiv:2303.10333 (HybridMIM).",
    "Hatamizadeh A, Nath V, Tang Y, Yang D, Roth HR, Xu D. Swin UNETR: Swin Transformers for Semantic Segmentation "
    "of Brain Tumors in MRI Images. BrainLes 2021, arXiv:2201.01266.",
    "Cardoso MJ, et al. MONAI: An open-source framework for deep learning in healthcare. arXiv:2211.02701 (2022).",
]


# ------------------------------------------------------------------------------------------------------------ README
def _monailabel_inputs(task: str) -> str:
    """README, MONAI Label: how the four BraTS sequences reach the bundle when MONAI Label hands it one image path."""
    if task != "brats":
        return ""
    return """MONAI Label hands the bundle one image per case: give the four sequences as one 4-channel NIfTI of shape
`(H, W, D, 4)` in the order T1, T1ce, T2, FLAIR (the channel order the network was trained with), with the sequences'
common affine; `LoadImaged` and `EnsureChannelFirstd` make it the `(4, H, W, D)` input. In a BraTS case folder:

```python
import nibabel as nib, numpy as np
case = "BraTS20_Training_001"
seqs = [nib.load(f"{case}_{m}.nii.gz") for m in ("t1", "t1ce", "t2", "flair")]
image = np.stack([s.get_fdata(dtype=np.float32) for s in seqs], axis=-1)
nib.save(nib.Nifti1Image(image, seqs[0].affine), f"{case}.nii.gz")
```

An MSD Task01 image is already 4-channel but in the order FLAIR, T1, T1gd, T2: reorder its last axis with
`[1, 2, 3, 0]` first. The label map that comes back has the case's grid (`H, W, D` and affine).

"""


def readme(backbone: str, task: str) -> str:
    t, b = TASKS[task], BACKBONES[backbone]
    name = bundle_name(backbone, task)
    pre = pretrain_bundle(backbone, task)
    classes = ", ".join(n for n, _ in t["classes"])
    n = len(t["classes"])
    roi = t["roi"]
    ct = t["modality"] == "CT"
    width = f"`{b['width_key']}` {b['width']}"
    cfg = "configs"
    run = "python -m monai.bundle run"
    if ct:
        prep = (
            f"- Orientation RAS, resampling to {t['pixdim'][0]} x {t['pixdim'][1]} x {t['pixdim'][2]} mm "
            "(bilinear image, nearest label).\n"
            "- Intensity: HU window `a_min` -1000 .. `a_max` 1000 scaled to [0, 1] and clipped (the window of the "
            "HybridMIM pretraining bundles, so the pretrained weights see the same intensities).\n"
            "- Crop to the body (`CropForegroundd`), pad to `roi_size` if smaller.\n"
        )
    else:
        prep = (
            "- The four sequences (t1, t1ce, t2, flair) stacked as channels; label to three channels TC, WT, ET "
            "(`ConvertToMultiChannelBasedOnBratsClassesd`).\n"
            "- Orientation RAS, resampling to 1 mm isotropic.\n"
            "- Crop to the brain (`CropForegroundd`), z-score normalisation per channel over the non-zero voxels "
            "(MONAI's `NormalizeIntensityd(nonzero=True, channel_wise=True)`, never undone by `Invertd`), pad to `roi_size` "
            "if smaller.\n"
        )
    loss = ("`DiceLoss` on the three sigmoid channels" if t["sigmoid"] else
            "`DiceCELoss` (softmax, one-hot labels)")
    post_text = (
        "sigmoid, threshold 0.5, inverted to the input grid, converted to one BraTS label map (1 necrotic/non-"
        "enhancing core, 2 oedema, 4 enhancing tumour)" if t["sigmoid"] else
        "softmax, inverted to the input grid (`Invertd`), argmax: one label map with the values of the classes above"
    )
    return f"""# {name}

## Model Overview

{b['title']} for {t['title']} on {t['modality']} images, finetuned from **HybridMIM** self-supervised pretraining.
HybridMIM (Xing et al., IEEE JBHI 2024) pretrains a 3D segmentation network on unlabelled volumes with two-level
masking and four objectives: partial-region reconstruction (pixel level), prediction of the number and the location
of masked patches in each sub-volume (region level) and dropout-based contrastive learning (sample level). Encoder
*and* decoder are pretrained; for finetuning only the last 1x1x1 layer (`{b['last_layer']}`) is replaced by a fresh
one with {n} output channels ({classes}).

This bundle starts from the backbone weights written by the `{pre}` bundle of this collection
(`pretrained_path`, default `$@bundle_root + '/../{pre}/models/model.pt'`), or from scratch with
`--pretrained_path ""`. `pretrained_path` may be a checkpoint file or a pretraining bundle folder (one with
`configs/metadata.json` and `models/model.pt`, e.g. one downloaded with `python -m monai.bundle download`); from a
folder its `models/model.pt` is loaded, after checking it against the SHA-256 the bundle's `large_files.yml` lists
(a mismatch stops the run, naming the file and both hashes). The weight loader logs what it loaded and stops with a
report if anything but the last layer does not fit (wrong backbone, width or input channels), instead of silently
training from random weights.
{public_weights_section(backbone == 'swin', pretraining=False)}
Network: `monai.networks.nets.{'SwinUNETR' if backbone == 'swin' else 'BasicUNet'}`, {width}, {t['in_channels']}
input channel(s), {n} output channels{' (sigmoid)' if t['sigmoid'] else ' (softmax)'}.

## Data

{t['data_text']}

Build the datalist (an MSD-form JSON with `training`, `validation` and `testing` lists; paths relative to
`dataset_dir`) with the HybridMIM Bundles repository's tool:

```bash
{t['prepare']}
# writes <dataset_dir>/datalist.json; the bundle reads it through dataset_dir + data_list_file_path
```

`label_fraction` (0-1, default 1.0) trains on a deterministic, nested share of the training list (20 % is a subset of
40 %), as in the paper's label-efficiency experiments. See `docs/data_license.txt` for the data terms.

### Preprocessing

{prep}- Training: `RandCropByPosNegLabeld` of `roi_size` {roi}^3 (`num_samples` {t['num_samples']} crops per volume,
  foreground/background 1:1) and the paper's light augmentation: random flips along each axis (p 0.2), random 90 degree
  rotations (p 0.2), intensity scaling and shifting by up to 10 % (p 0.1 each).

## Training configuration

| setting | default | override |
|---|---|---|
| epochs | {t['max_epochs']} (the paper's) | `--train#trainer#max_epochs` |
| optimiser | AdamW, lr 1e-4, weight decay 1e-5 | `--learning_rate`, `--weight_decay` |
| schedule | linear warm-up over 50 epochs, then cosine decay to 0 (stepped per iteration) | `--warmup_epochs` |
| loss | {loss} | `loss` |
| crop | {roi}^3, batch 1 volume x {t['num_samples']} crops | `--roi_size`, `--num_samples` |
| validation | every {t['val_interval']} epochs, sliding window ({roi}^3, overlap 0.5), mean Dice{' over TC/WT/ET' if t['sigmoid'] else ' without background'} and Dice per class | `--val_interval` |
| mixed precision | on (CUDA) | `--amp false` |
| autocast dtype | float16 | `--amp_dtype bfloat16` |
| width | {width} | `--{b['width_key']}` |
| caching | `cache_rate` {t['cache_rate']} | `--cache_rate` |

The best network (mean validation Dice) is saved to `models/model.pt` as a flat state dict. A full checkpoint
(network, optimiser, scheduler, trainer state) `models/checkpoint_epoch=<N>.pt` is written every `val_interval`
epochs and `models/checkpoint_final.pt` at the end or on an error; the best validation Dice is kept in it, so a
resumed run replaces `model.pt` only by a better model. {RESUME_GUARANTEE} TensorBoard logs go to `eval/`; the
console shows a progress bar.

### Memory consumption

Not measured by us for this bundle. To fit a smaller GPU lower `num_samples`, `roi_size` (multiples of 32) or
{'`feature_size`' if backbone == 'swin' else '`features`'}{', keep `use_checkpoint` (gradient checkpointing) on' if backbone == 'swin' else ''}
and keep `amp` on; lower `cache_rate` when host memory is short.

### Input

{t['in_channels']} channel(s){' (T1, T1ce, T2, FLAIR)' if not ct else ' CT'}, patches of `roi_size` after the preprocessing above:
{'sides multiples of 32 and at least 64 (metadata `32*(n+1)`: SwinUNETR downsamples by 32 and its instance norm needs more than one voxel at the bottleneck)' if backbone == 'swin' else 'sides multiples of 32 (metadata `32*n`; BasicUNet itself needs multiples of 16)'}.

### Output

{n} channels: {classes}. After the inference post-processing: {post_text}; saved as `<image name>_seg.nii.gz` under
`output_dir`, with the input image's shape and affine.

## Performance

### Measured with this bundle

{performance_section(name)}
### Reported in the HybridMIM paper

For reference only: these are the paper's figures (its splits, hardware and code), not measured with this bundle.
{t['paper']}

## MONAI Bundle Commands

Run from this bundle's folder (`bundle_root` is `.`), or pass `--bundle_root <path to this folder>`. The configs
import `hybridmim_components` (`pip install hybridmim-components` or `pip install -e <repository>`).

Train from the HybridMIM pretrained backbone (train the `{pre}` bundle first, or point `--pretrained_path` to its
`model.pt`):

```bash
{run} --config_file {cfg}/train.json --dataset_dir {t['dataset_dir']}
```

From pretrained weights someone shared as a bundle zip (packed with the repository's `tools/bundles/pack_bundle.py`):
download it, then pass the bundle folder:

```bash
python -m monai.bundle download --name {pre} --url <URL of {pre}_v<version>.zip> --bundle_dir downloaded
{run} --config_file {cfg}/train.json --dataset_dir {t['dataset_dir']} \\
    --pretrained_path downloaded/{pre}
```

From-scratch baseline (no pretraining):

```bash
{run} --config_file {cfg}/train.json --pretrained_path ""
```

Label-efficiency (e.g. 20 % of the training labels):

```bash
{run} --config_file {cfg}/train.json --label_fraction 0.2
```

Resume an interrupted training from the most advanced full checkpoint in `ckpt_dir`:

```bash
{run} --config_file {cfg}/train.json --resume true
```

Multi-GPU training (DDP, one process per GPU; rank 0 logs and saves; on CPU the `gloo` backend is used):

```bash
torchrun --standalone --nnodes=1 --nproc_per_node=<N> -m monai.bundle run \\
    --config_file "['{cfg}/train.json','{cfg}/multi_gpu_train.json']"
```

Evaluate `models/model.pt` on the validation list at the original resolution (the preprocessing is inverted):
Dice and 95 % Hausdorff distance (mm) per class, written to `eval/metrics.csv`, per image to
`eval/val_mean_dice_raw.csv` / `eval/val_mean_hd95_raw.csv` and summarised in `eval/*_summary.csv` (there the
columns `class0`, `class1`, ... are the scored classes in the network's channel order{'' if t['sigmoid'] else ', background left out'}).
Each case's label map is written too, as `eval/<image name>_seg.nii.gz` on the input image's grid and affine
(`--save_predictions false` skips them):

```bash
{run} --config_file "['{cfg}/train.json','{cfg}/evaluate.json']"
```

Inference on the datalist's `testing` list (one label map per input under `eval/`):

```bash
{run} --config_file {cfg}/inference.json
```

Check the network's input/output against the metadata and export TorchScript:

```bash
python -m monai.bundle verify_net_in_out network_def --meta_file {cfg}/metadata.json --config_file {cfg}/inference.json
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file {cfg}/metadata.json --config_file {cfg}/inference.json --use_trace True
```

{onnx_readme_section(backbone, t['in_channels'], roi, cfg)}### MONAI Label

The bundle follows the keys MONAI Label's `monaibundle` app reads (`network_def`, `preprocessing`, `inferer`,
`postprocessing` in `inference.json`; `train#trainer#max_epochs`, `train#dataset#data`, `validate#dataset#data`,
`train#handlers` in `train.json`; `multi_gpu_train.json`). Copy this folder into the app's model folder and install
`hybridmim_components` into MONAI Label's environment (tested with MONAI Label 0.8.5 on MONAI 1.5.1 and 1.6.1):

```bash
monailabel apps --download --name monaibundle --output apps
monailabel start_server --app apps/monaibundle --studies <images> --conf models {name} --conf zoo_source local
```

{_monailabel_inputs(task)}Inference needs a trained `models/model.pt`.{' MONAI Label names the labels after `network_data_format.outputs.pred.channel_def` of the metadata, which here names the values of the BraTS label map that the post-processing writes (1 necrotic/non-enhancing core, 2 oedema, 4 enhancing tumour) rather than the three sigmoid channels TC/WT/ET.' if t['sigmoid'] else ''}

## References

{chr(10).join('- ' + r for r in REFERENCES)}

## License

The bundle's code and configs: Apache License 2.0 (see `LICENSE`). The data: see `docs/data_license.txt`; weights
trained with this bundle inherit the data's terms.
"""


def build_bundle(backbone: str, task: str) -> dict:
    t = TASKS[task]
    return {
        "configs/train.json": train_config(backbone, task),
        "configs/evaluate.json": evaluate_config(backbone, task),
        "configs/multi_gpu_train.json": multi_gpu_config(backbone, task),
        "configs/inference.json": inference_config(backbone, task),
        **onnx_files(backbone, SEED),
        "configs/metadata.json": metadata(backbone, task),
        "docs/README.md": readme(backbone, task),
        "docs/data_license.txt": "Third Party Licenses\n" + "-" * 72 + "\n\n" + t["licence"],
    }


def bundles() -> dict:
    """``{bundle_name: {relative_path: content}}`` for the eight finetuning bundles."""
    return {
        bundle_name(backbone, task): copy.deepcopy(build_bundle(backbone, task))
        for backbone in BACKBONES
        for task in TASKS
    }
