"""The four HybridMIM pretraining bundles, built by one function so that they differ only by a few parameters.

| bundle | backbone | data | channels | crop | region | batch (volumes × crops) |
|---|---|---|---|---|---|---|
| hybridmim_swin_pretrain | SwinUNETR | unlabeled CT pool | 1 | 96³ | 64³ | 2 × 2 |
| hybridmim_unet_pretrain | BasicUNet | unlabeled CT pool | 1 | 96³ | 64³ | 2 × 2 |
| hybridmim_swin_pretrain_brats | SwinUNETR | BraTS 2020 MRI | 4 | 128³ | 96³ | 1 × 2 |
| hybridmim_unet_pretrain_brats | BasicUNet | BraTS 2020 MRI | 4 | 128³ | 96³ | 1 × 2 |

Files: ``configs/{train,evaluate,inference,multi_gpu_train,metadata}.json``, ``docs/README.md``,
``docs/data_license.txt`` (logging.conf, LICENSE, models/.gitkeep come from ``common.py``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from tools.bundles.bundlegen.common import (WORKFLOW, ADAMW, ATTACH_RANDOM_STATES, DDP_DEVICE, DDP_FINALIZE, DDP_NETWORK,
                                            DOWNSAMPLE, PRETRAINED_KEYS, USE_V2, RANDOM_STATES, RESUME_GUARANTEE, SAVER,
                                            load_pretrained_call, location_keys, metadata_header,
                                            preprocessing_record, provenance_recorder, public_weights_section,
                                            ATTACH_PROVENANCE, CHECK_TRAINED_SETTINGS, architecture_record,
                                            trained_settings_check)
from tools.bundles.bundlegen.figures import performance_section
from tools.bundles.bundlegen import pool
from tools.bundles.bundlegen.identity import CHANGED_SETTINGS, loader_keys, run_identity, unless_resuming

# one progress bar (with the loss) for both bundle families, listed in train#handlers
PROGRESS_BAR = {"_target_": "hybridmim_components.workflow.TrainProgressBar"}
# under torchrun every rank draws its own crops and masks: seed + global rank (RANK, set by torchrun)
RANK_SEED = "@seed + int(os.environ.get('RANK', '0'))"
# volumes cached in memory per process: 200 x ~35-70 MB per CT (measured, see the README's Memory section) <= 14 GB
CACHE_NUM = 200
TOTAL_STEPS = 100_000
STEPS_PER_EPOCH = 1000


@dataclass(frozen=True)
class Spec:
    name: str
    backbone: str  # "swin" | "unet"
    data: str  # "ct" | "brats"

    @property
    def ct(self) -> bool:
        return self.data == "ct"

    @property
    def in_channels(self) -> int:
        return 1 if self.ct else 4

    @property
    def roi(self) -> int:
        return 96 if self.ct else 128

    @property
    def region(self) -> int:
        return 64 if self.ct else 96

    @property
    def batch_size(self) -> int:  # volumes per step; ×2 crops per volume -> 4 (96³) or 2 (128³) crops
        return 2 if self.ct else 1

    @property
    def backbone_name(self) -> str:
        return "SwinUNETR" if self.backbone == "swin" else "BasicUNet"

    @property
    def dataset_dir(self) -> str:
        return "/workspace/data/ct_pool" if self.ct else "/workspace/data/BraTS2020"

    @property
    def finetune_bundles(self) -> list[str]:
        if self.ct:
            return [f"hybridmim_{self.backbone}_{t}" for t in ("btcv", "msd_spleen", "msd_liver")]
        return [f"hybridmim_{self.backbone}_brats"]


SPECS = [
    Spec("hybridmim_swin_pretrain", "swin", "ct"),
    Spec("hybridmim_unet_pretrain", "unet", "ct"),
    Spec("hybridmim_swin_pretrain_brats", "swin", "brats"),
    Spec("hybridmim_unet_pretrain_brats", "unet", "brats"),
]


# --- shared config pieces -----------------------------------------------------------------------------------------
def _head(spec: Spec) -> dict:
    """Top of every config: paths, device, the method's hyper-parameters and the network."""
    width = ({"feature_size": 48, "downsample": DOWNSAMPLE, "use_v2": USE_V2} if spec.backbone == "swin"
             else {"features": [32, 32, 64, 128, 256, 32]})
    if spec.backbone == "swin":
        network_def = {
            "_target_": "hybridmim_components.HybridMIMSwinUNETR",
            "in_channels": "@in_channels",
            "feature_size": "@feature_size",
            "drop_rate": 0.1,
            "sub_volume_size": "@sub_volume_size",
            "region_size": "@region_size",
            "use_checkpoint": False,
            "downsample": "@downsample",
            "use_v2": "@use_v2",
        }
    else:
        network_def = {
            "_target_": "hybridmim_components.HybridMIMUNet",
            "in_channels": "@in_channels",
            "features": "@features",
            "dropout": 0.1,
            "sub_volume_size": "@sub_volume_size",
            "region_size": "@region_size",
        }
    return {
        "imports": [
            "$import os",
            "$import torch",
            "$import hybridmim_components",
            "$import hybridmim_components.workflow",
            "$from hybridmim_components.workflow import load_datalist",
        ],
        **location_keys(spec.dataset_dir),
        "seed": 0,
        "in_channels": spec.in_channels,
        "pixdim": [1.5, 1.5, 2.0] if spec.ct else [1.0, 1.0, 1.0],
        **({"a_min": -1000.0, "a_max": 1000.0} if spec.ct else {}),
        "roi_size": [spec.roi] * 3,
        "region_size": [spec.region] * 3,
        "sub_volume_size": 32,
        "patch_size": 16,
        "mask_ratio": 0.4,
        "mask_value": 0.0,
        **width,
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
    }


def _deterministic_transforms(spec: Spec) -> list:
    """Loading and intensity preprocessing (cached by CacheDataset), then padding to at least the crop size."""
    keys = "image"
    load = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
        {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS"},
    ]
    if spec.ct:
        intensity = [
            {"_target_": "Spacingd", "keys": keys, "pixdim": "@pixdim", "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": keys, "a_min": "@a_min", "a_max": "@a_max",
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "CropForegroundd", "keys": keys, "source_key": keys, "allow_smaller": True},
        ]
    else:
        intensity = [
            {"_target_": "Spacingd", "keys": keys, "pixdim": "@pixdim", "mode": "bilinear"},
            {"_target_": "CropForegroundd", "keys": keys, "source_key": keys, "allow_smaller": True},
            {"_target_": "NormalizeIntensityd", "keys": keys, "nonzero": True, "channel_wise": True},
        ]
    pad = [
        {"_target_": "SpatialPadd", "keys": keys, "spatial_size": "@roi_size"},
        {"_target_": "EnsureTyped", "keys": keys, "dtype": "$torch.float32", "track_meta": True},
    ]
    return load + intensity + pad


MASK = {
    "_target_": "hybridmim_components.HierarchicalMaskd",
    "keys": "image",
    "sub_volume_size": "@sub_volume_size",
    "patch_size": "@patch_size",
    "mask_ratio": "@mask_ratio",
    "mask_value": "@mask_value",
}
CENTER_CROP = {"_target_": "CenterSpatialCropd", "keys": "image", "roi_size": "@roi_size"}


def _train_config(spec: Spec) -> dict:
    loss_terms = "$hybridmim_components.workflow.loss_terms_transform(@loss, @optimizer)"
    full_ckpt = {
        "network": "@network_def",
        "optimizer": "@optimizer",
        "lr_scheduler": "@lr_scheduler",
        "trainer": "@train#trainer",
        "best_validation": "@train#best_validation",
        "grad_scaler": "@train#grad_scaler",
        "random_states": "@train#random_states",
    }
    val_handlers = _validation_handlers()
    loss = {
        "_target_": "hybridmim_components.HybridMIMLoss",
        "reconstruction_weight": 1.0,
        "number_weight": 0.1,
        "location_weight": 0.1,
        "consistency_weight": 0.01,
        "contrastive_weight": 0.1,
        "temperature": 0.5,
    }
    best_savers = [f"@validate#handlers#{i}" for i, h in enumerate(val_handlers) if h["_target_"] == SAVER]
    return {
        **_head(spec),
        "amp": True,
        # autocast dtype with amp on (MONAI's default float16; bfloat16 on Ampere and newer needs no loss scaling)
        "amp_dtype": "float16",
        "resume": False,
        # continue a checkpoint of another run (other settings) on purpose; false: only this run's are resumed
        **CHANGED_SETTINGS,
        # warm start: backbone weights to continue pretraining from (our model.pt, a pretraining bundle folder, or
        # a public checkpoint: Tang et al., model zoo, VoCo, SuPreM, DAE, the authors'); the heads start fresh
        "pretrained_path": None,
        **PRETRAINED_KEYS,
        "preprocessing_record": preprocessing_record(spec.ct),
        # read every file of the datalist once before caching (stops on a truncated/corrupt file, wrong channels,
        # NaN/inf voxels); false skips the scan of a huge pool
        "check_data": True,
        # stop after this many iterations in a row with a NaN/inf loss (their optimizer steps are skipped)
        "max_nonfinite_steps": 20,
        # preprocessed volumes are cached in memory: at most cache_num per process (~35-70 MB per CT volume), the
        # rest are preprocessed on the fly; under DDP each process caches only its share of the lists
        "cache_rate": 1.0,
        "cache_num": CACHE_NUM,
        "batch_size": spec.batch_size,
        "samples_per_volume": 2,
        "learning_rate": 1e-4,
        "weight_decay": 1e-5,
        "warmup_steps": 500,
        "steps_per_epoch": STEPS_PER_EPOCH,
        "val_interval": 5,
        "loss": loss,
        "optimizer": dict(ADAMW),
        "lr_scheduler": {
            "_target_": "monai.optimizers.WarmupCosineSchedule",
            "optimizer": "@optimizer",
            "warmup_steps": "@warmup_steps",
            "t_total": "$@steps_per_epoch * @train#trainer#max_epochs",
        },
        "prepare_batch": {"_target_": f"{WORKFLOW}.PrepareMIMBatch"},
        "train": {
            "deterministic_transforms": _deterministic_transforms(spec),
            "random_transforms": [
                {"_target_": "RandSpatialCropSamplesd", "keys": "image", "roi_size": "@roi_size",
                 "num_samples": "@samples_per_volume", "random_size": False},
                MASK,
            ],
            "preprocessing": {
                "_target_": "Compose",
                "transforms": "$@train#deterministic_transforms + @train#random_transforms",
            },
            "dataset": {
                "_target_": "CacheDataset",
                "data": "$load_datalist(@dataset_dir, @data_list_file_path, 'training')",
                "transform": "@train#preprocessing",
                "cache_rate": "@cache_rate",
                "cache_num": "@cache_num",
                "num_workers": "@train#dataloader#num_workers",
            },
            # exactly steps_per_epoch batches per pass (random volumes, without replacement within each pass over
            # the pool): every epoch starts a fresh iterator, so a resumed run draws the same order as an
            # uninterrupted one
            "sampler": {
                "_target_": "torch.utils.data.RandomSampler",
                "data_source": "@train#dataset",
                "num_samples": "$@steps_per_epoch * @batch_size",
            },
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@train#dataset",
                "batch_size": "@batch_size",
                "sampler": "@train#sampler",
                "shuffle": False,
                "num_workers": 4,
                "pin_memory": "$torch.cuda.is_available()",
            },
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": [
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval"},
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "epoch_level": False,
                 "print_lr": False},
                {"_target_": "StatsHandler", "tag_name": "train_loss", "output_transform": loss_terms},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "tag_name": "train_loss",
                 "output_transform": loss_terms},
                dict(PROGRESS_BAR),
            ],
            "trainer": {
                "_target_": "SupervisedTrainer",
                "max_epochs": TOTAL_STEPS // STEPS_PER_EPOCH,
                "epoch_length": "@steps_per_epoch",
                "device": "@device",
                "train_data_loader": "@train#dataloader",
                "network": "@network",
                "optimizer": "@optimizer",
                "loss_function": "@loss",
                "inferer": "@train#inferer",
                "prepare_batch": "@prepare_batch",
                "train_handlers": "@train#handlers",
                "amp": "$hybridmim_components.workflow.config_flag(@amp, 'amp') and torch.cuda.is_available()",
                "amp_kwargs": "$hybridmim_components.workflow.amp_kwargs(@amp_dtype)",
                "decollate": False,
            },
            # full training checkpoints (for resume); they reference the trainer, so they are attached in
            # `initialize` instead of being listed in train#handlers (that would be a circular reference)
            "checkpoint_saver": {
                "_target_": SAVER,
                "save_dir": "@ckpt_dir",
                "save_dict": {**full_ckpt, "run_identity": "@train#run_identity"},
                "save_interval": 1,
                "epoch_level": True,
                "n_saved": 2,
                "save_final": True,
                "final_filename": "checkpoint_final.pt",
            },
            # best val_recon_mse so far and the best-model savers' records, kept in the full checkpoint so that a
            # resumed run does not overwrite models/model.pt with a worse model
            "best_validation": {
                "_target_": f"{WORKFLOW}.BestMetricState",
                "evaluator": "@validate#evaluator",
                "savers": best_savers,
            },
            # the AMP loss scale (trainer.scaler, created by trainer.run() when amp is on), kept in the full
            # checkpoint so that a resumed run does not calibrate it again
            "grad_scaler": {"_target_": f"{WORKFLOW}.GradScalerState", "trainer": "@train#trainer"},
            "random_states": dict(RANDOM_STATES),
            "checkpoint_loader": {
                "_target_": f"{WORKFLOW}.ResumeFromLatestCheckpoint",
                "ckpt_dir": "@ckpt_dir",
                "load_dict": full_ckpt,
                "enabled": "$hybridmim_components.workflow.config_flag(@resume, 'resume')",
                "map_location": "@device",
                **loader_keys(),
            },
            # every datalist file read once before any data is cached (configs/pool_store.json checks the store
            # instead: a run from the store needs no NIfTI file and no datalist)
            "data_check": "$hybridmim_components.workflow.check_datalist(@dataset_dir, @data_list_file_path, "
                          "('training', 'validation'), image_channels=@in_channels, enabled=@check_data)",
            # what makes this run this run (saved in every full checkpoint; resume continues only the same)
            "run_identity": run_identity(
                "$hybridmim_components.workflow.datalist_identity(@dataset_dir, @data_list_file_path)",
                _head(spec)["network_def"], loss, dict(ADAMW),
                {"seed": "@seed", "preprocessing": "@preprocessing_record", "patch_size": "@patch_size",
                 "mask_ratio": "@mask_ratio", "mask_value": "@mask_value", "batch_size": "@batch_size",
                 "samples_per_volume": "@samples_per_volume", "steps_per_epoch": "@steps_per_epoch",
                 "lr_scheduler#warmup_steps": "@lr_scheduler#warmup_steps"}),
            # skips the optimizer step of a NaN/inf loss, logs it, stops after max_nonfinite_steps in a row;
            # references the trainer's optimizer, so it is attached in `initialize`
            "nonfinite_guard": {
                "_target_": "hybridmim_components.workflow.NonFiniteLossGuard",
                "max_nonfinite_steps": "@max_nonfinite_steps",
            },
            # models/model.provenance.json: what a finetune must match to use models/model.pt (preprocessing,
            # backbone, merging order, versions, pool and steps); rewritten whenever model.pt is saved
            "provenance": _provenance_recorder(spec),
        },
        "validate": {
            "preprocessing": {
                "_target_": "Compose",
                "transforms": "$@train#deterministic_transforms + @validate#random_transforms",
            },
            "random_transforms": [CENTER_CROP, MASK],
            "dataset": {
                "_target_": "CacheDataset",
                "data": "$load_datalist(@dataset_dir, @data_list_file_path, 'validation')",
                "transform": "@validate#preprocessing",
                "cache_rate": "@cache_rate",
                "cache_num": "@cache_num",
                "num_workers": "@validate#dataloader#num_workers",
            },
            "generator": "$torch.Generator()",
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@validate#dataset",
                "batch_size": 1,
                "shuffle": False,
                "num_workers": 2,
                "generator": "@validate#generator",
            },
            "inferer": {"_target_": "SimpleInferer"},
            "key_metric": {
                "val_recon_mse": {"_target_": f"{WORKFLOW}.MaskedReconstructionMSE", "device": "@device"},
            },
            "additional_metrics": {
                "val_number_acc": {"_target_": f"{WORKFLOW}.NumberAccuracy", "device": "@device"},
                "val_location_acc": {"_target_": f"{WORKFLOW}.LocationAccuracy", "device": "@device"},
                # what a predictor ignoring the image scores on the same crops and masks
                "val_recon_mse_baseline": {"_target_": f"{WORKFLOW}.MaskedReconstructionBaseline", "device": "@device"},
                "val_number_acc_baseline": {"_target_": f"{WORKFLOW}.NumberAccuracyBaseline", "device": "@device"},
                "val_location_acc_baseline": {"_target_": f"{WORKFLOW}.LocationAccuracyBaseline", "device": "@device"},
            },
            "handlers": val_handlers,
            "evaluator": {
                "_target_": "SupervisedEvaluator",
                "device": "@device",
                "val_data_loader": "@validate#dataloader",
                "network": "@network",
                "inferer": "@validate#inferer",
                "prepare_batch": "@prepare_batch",
                "key_val_metric": "@validate#key_metric",
                "additional_metrics": "@validate#additional_metrics",
                "metric_cmp_fn": f"${WORKFLOW}.lower_is_better",
                "val_handlers": "@validate#handlers",
                "amp": "$hybridmim_components.workflow.config_flag(@amp, 'amp') and torch.cuda.is_available()",
                "amp_kwargs": "$hybridmim_components.workflow.amp_kwargs(@amp_dtype)",
                "decollate": False,
            },
        },
        "initialize": _train_initialize(),
        "run": ["$@train#trainer.run()"],
    }


def _validation_handlers() -> list:
    return [
        {"_target_": f"{WORKFLOW}.ReseedHandler", "seed": "@seed", "transform": "@validate#preprocessing",
         "generator": "@validate#generator"},
        {"_target_": "StatsHandler", "iteration_log": False},
        {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
        {"_target_": f"{WORKFLOW}.MIMPreviewHandler", "log_dir": "@output_dir"},
        {"_target_": SAVER, "save_dir": "@ckpt_dir",
         "save_dict": {"model": "$@network_def.backbone"}, "save_key_metric": True,
         "key_metric_filename": "model.pt", "key_metric_negative_sign": True},
        {"_target_": SAVER, "save_dir": "@ckpt_dir", "save_dict": {"model": "@network_def"},
         "save_key_metric": True, "key_metric_filename": "pretrain_network.pt",
         "key_metric_negative_sign": True},
    ]


def _provenance_recorder(spec: Spec) -> dict:
    return provenance_recorder(
        spec.backbone_name, spec.backbone == "swin", "@in_channels", spec.name,
        pool_size="$len(load_datalist(@dataset_dir, @data_list_file_path, 'training'))",
        steps_planned="$@steps_per_epoch * @train#trainer#max_epochs",
    )


def _train_initialize(seed: str = "@seed", saver_condition: str = "") -> list:
    saver = "$@train#checkpoint_saver.attach(@train#trainer)"
    if saver_condition:
        saver = f"$@train#checkpoint_saver.attach(@train#trainer) if {saver_condition} else None"
    return [
        # seeded first: the network is built (lazily) by the first entry that references it, and must start from
        # the same weights in every run
        f"$monai.utils.set_determinism(seed={seed})",
        # crop, sub-volume, patch and region sizes, then every datalist file, are checked before any data is cached
        "$@network_def.check_crop(@roi_size, @patch_size)",
        "$@train#data_check",
        "$hybridmim_components.workflow.check_contrastive_batch(@loss#contrastive_weight, @batch_size, "
        "@samples_per_volume)",
        # warm start of the backbone (pretrained_path null: from scratch); a resumed run then loads its checkpoint
        unless_resuming(load_pretrained_call("@network_def.backbone")),
        ATTACH_RANDOM_STATES,
        ATTACH_PROVENANCE,
        saver,
        "$@train#checkpoint_loader.attach(@train#trainer)",
        "$@train#nonfinite_guard.attach(@train#trainer)",
    ]


def _multi_gpu_config(train: dict) -> dict:
    """torchrun DDP layered on train.json: NCCL on GPUs, gloo on CPU; rank 0 logs and saves."""
    rank0_train = [i for i, h in enumerate(train["train"]["handlers"])
                   if h["_target_"] in ("StatsHandler", "TensorBoardStatsHandler", PROGRESS_BAR["_target_"])]
    rank0_val = [i for i, h in enumerate(train["validate"]["handlers"])
                 if h["_target_"] in ("StatsHandler", "TensorBoardStatsHandler", f"{WORKFLOW}.MIMPreviewHandler",
                                      SAVER)]
    config = {
        "device": DDP_DEVICE,
        "network": dict(DDP_NETWORK),
        # each process caches only its share of the lists (not every volume on every rank): training shards of
        # equal length (seeded shuffle), validation split as a DistributedSampler without shuffle would split it
        "train#dataset#data": "$hybridmim_components.workflow.partition_for_rank(load_datalist(@dataset_dir, "
        "@data_list_file_path, 'training'), shuffle=True, seed=@seed, even_divisible=True, what='training list')",
        "validate#dataset#data": "$hybridmim_components.workflow.partition_for_rank(load_datalist(@dataset_dir, "
        "@data_list_file_path, 'validation'), what='validation list')",
    }
    for i in rank0_train:
        config[f"train#handlers#{i}#_disabled_"] = "$dist.get_rank() > 0"
    for i in rank0_val:
        config[f"validate#handlers#{i}#_disabled_"] = "$dist.get_rank() > 0"
    config["initialize"] = [
        "$import torch.distributed as dist",
        "$dist.is_initialized() or dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')",
        "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
        # a different random stream per rank (crops and masks), reproducible for a given world size
        *_train_initialize(seed=RANK_SEED, saver_condition="dist.get_rank() == 0"),
    ]
    config["run"] = ["$@train#trainer.run()"]
    config["finalize"] = list(DDP_FINALIZE)
    return config


def _evaluate_config(spec: Spec) -> dict:
    """Layered on train.json: pretext metrics of the saved model on the validation list."""
    return {
        # the saved model.pt is loaded into train.json's network_def: its settings are checked against the record
        **_trained_settings_keys(spec),
        "network_def#_requires_": "@trained_settings_check",
        "validate#handlers": [
            {"_target_": f"{WORKFLOW}.ReseedHandler", "seed": "@seed", "transform": "@validate#preprocessing",
             "generator": "@validate#generator"},
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "MetricsSaver", "save_dir": "@output_dir",
             "metrics": ["val_recon_mse", "val_number_acc", "val_location_acc", "val_recon_mse_baseline",
                         "val_number_acc_baseline", "val_location_acc_baseline"]},
        ],
        "initialize": [
            "$monai.utils.set_determinism(seed=@seed)",
            f"${WORKFLOW}.load_pretrain_checkpoint(@network_def, @ckpt_dir + '/model.pt', "
            "@ckpt_dir + '/pretrain_network.pt', map_location=@device)",
        ],
        "run": ["$@validate#evaluator.run()"],
    }


def _trained_settings_keys(spec: Spec) -> dict:
    """Keys of the configs that load the saved ``models/model.pt`` (inference, evaluate): the network in the
    record's fields and the check against ``models/model.provenance.json`` (``_requires_`` of ``network_def``)."""
    swin = spec.backbone == "swin"
    return {
        "check_trained_settings": CHECK_TRAINED_SETTINGS,
        "architecture_record": architecture_record("SwinUNETR" if swin else "BasicUNet", swin,
                                                   in_channels="@in_channels", out_channels=None),
        "trained_settings_check": trained_settings_check(),
    }


def _inference_config(spec: Spec, train: dict) -> dict:
    """Standalone: mask each `testing` volume (seeded) and write masked input + region reconstruction as NIfTI.

    `network_def` here is not the pretraining network (a dict of outputs, for the loss) but the backbone class
    with a region-reconstruction forward (`hybridmim_components.reconstruction`): one tensor out, as metadata's
    `network_data_format` describes (so the zoo's `verify_net_in_out` checks it), and exactly the parameters of
    `models/model.pt` (so it loads strictly and `ckpt_export` works on it).
    """
    head = _head(spec)
    if spec.backbone == "swin":
        head["network_def"] = {
            "_target_": "hybridmim_components.reconstruction.RegionReconstructionSwinUNETR",
            "in_channels": "@in_channels",
            "feature_size": "@feature_size",
            "drop_rate": 0.1,
            "region_size": "@region_size",
            "downsample": "@downsample",
            "use_v2": "@use_v2",
        }
    else:
        head["network_def"] = {
            "_target_": "hybridmim_components.reconstruction.RegionReconstructionUNet",
            "in_channels": "@in_channels",
            "features": "@features",
            "dropout": 0.1,
            "region_size": "@region_size",
        }
    head["network_def"]["_requires_"] = "@trained_settings_check"  # also when MONAI Label or ckpt_export build it
    return {
        **head,
        "preprocessing_record": preprocessing_record(spec.ct),
        **_trained_settings_keys(spec),
        "checkpointloader": {
            "_target_": "CheckpointLoader",
            "load_path": "$@ckpt_dir + '/model.pt'",
            "load_dict": {"model": "@network_def"},
            "map_location": "@device",
            "strict": True,
        },
        "preprocessing": {
            "_target_": "Compose",
            "transforms": copy.deepcopy(train["train"]["deterministic_transforms"]) + [CENTER_CROP, MASK],
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "$load_datalist(@dataset_dir, @data_list_file_path, 'testing')",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 2,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "prepare_batch": {"_target_": f"{WORKFLOW}.PrepareMIMBatch"},
        # the network returns the region's reconstruction; the output saver also needs where the region sits
        "postprocessing": {
            "_target_": "Lambdad",
            "keys": "pred",
            "func": "$lambda recon: {'reconstruction': recon, "
                    "'region_slices': @network_def.region_slices(@roi_size)}",
        },
        "handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": f"{WORKFLOW}.SaveMIMOutputs", "output_dir": "@output_dir"},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "prepare_batch": "@prepare_batch",
            "val_handlers": "@handlers",
            "postprocessing": "@postprocessing",
            "decollate": False,
        },
        "initialize": [
            "$monai.utils.set_determinism(seed=@seed)",
            # models/model.pt is the flat backbone state dict: exactly network_def's parameters
            "$@checkpointloader(@evaluator)",
        ],
        "run": ["$@evaluator.run()"],
    }


def _metadata(spec: Spec) -> dict:
    mode = "generic (unlabeled CT pool)" if spec.ct else "task-specific (BraTS 2020 training split)"
    modality = "CT" if spec.ct else "MR"
    channels = "CT intensity window -1000..1000 HU scaled to [0, 1]" if spec.ct else (
        "4 MRI modalities (T1, T1ce, T2, FLAIR), each z-scored on its non-zero voxels")
    meta = metadata_header(
        description=(
            f"HybridMIM self-supervised pretraining of a {spec.backbone_name} ({mode}): two-level masking of "
            f"{spec.roi}^3 crops, partial-region reconstruction of the central {spec.region}^3 region, mask-number, "
            "mask-location, consistency and dropout-contrastive losses. models/model.pt holds the backbone weights "
            f"for the finetuning bundles {', '.join(spec.finetune_bundles)}."
        ),
        task=f"Self-supervised pretraining ({spec.backbone_name}, {modality})",
    )
    meta.update({
        "data_source": (
            "a pool of public unlabeled abdominal/chest CT (e.g. BTCV, MSD, TCIA, LIDC-IDRI); see docs/data_license.txt"
            if spec.ct else "BraTS 2020 training data (https://www.med.upenn.edu/cbica/brats2020/data.html)"
        ),
        "data_type": "nibabel",
        "image_classes": channels,
        "pred_classes": "reconstruction of the original (unmasked) intensities in the central region",
        "intended_use": "Pretraining backbone weights for the HybridMIM finetuning bundles; not for clinical use.",
        "references": [
            "Xing, Z., Zhu, L., Yu, L., Xing, Z., Wan, L. Hybrid Masked Image Modeling for 3D Medical Image "
            "Segmentation. IEEE Journal of Biomedical and Health Informatics, 2024. arXiv:2303.10333 (HybridMIM).",
            "Hatamizadeh, A. et al. Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI "
            "Images. BrainLes 2021." if spec.backbone == "swin" else
            "Falk, T. et al. U-Net: deep learning for cell counting, detection, and morphometry. Nature Methods, 2019.",
        ],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": modality,
                    "num_channels": spec.in_channels,
                    "spatial_shape": [spec.roi] * 3,
                    "dtype": "float32",
                    "value_range": [0, 1] if spec.ct else [],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"} if spec.ct else
                    {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": spec.in_channels,
                    "spatial_shape": [spec.region] * 3,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "reconstruction"} if spec.ct else
                    {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
                }
            },
        },
    })
    return meta


# --- docs -----------------------------------------------------------------------------------------------------------
def _memory_text(spec: Spec) -> str:
    """Host memory per cached volume (figures from `python tools/benchmarks/measure_cache_memory.py`)."""
    if spec.ct:
        return (
            "A CT of 512 × 512 × 200 voxels at 0.8 × 0.8 × 2.5 mm, resampled to 1.5 × 1.5 × 2.0 mm, is a 273 × 273 × "
            "250 grid: 18.6 M voxels, 71 MB before the crop to the body (in general (512 s/1.5)² (200 t/2.0) × 4 "
            "bytes for in-plane spacing s and slice spacing t). Measured on a generated volume of that size "
            "(`python tools/benchmarks/measure_cache_memory.py --shape 512,512,200 --spacing 0.8,0.8,2.5`): 1 × 227 × 189 × 215 "
            "voxels cached, 35 MB (the process grew by 57 MB). Caching every volume of a pool of 500 CTs would take "
            f"18-36 GB per process; at most {CACHE_NUM} volumes take 7-14 GB."
        )
    return (
        "A BraTS case is 4 × 240 × 240 × 155 voxels at 1 mm: 143 MB before the crop to the brain (computed), less "
        f"after it. Caching the 295 cases of an 80 % training split would take up to 42 GB per process; at most "
        f"{CACHE_NUM} cases take up to 28 GB."
    )


def _readme(spec: Spec) -> str:
    width_key = "feature_size" if spec.backbone == "swin" else "features"
    width_default = "48" if spec.backbone == "swin" else "[32, 32, 64, 128, 256, 32]"
    small = "--feature_size 12" if spec.backbone == "swin" else "--features '[4,4,8,8,16,4]'"
    if spec.ct:
        data = (
            "A pool of unlabeled CT volumes (the paper pools public abdominal and chest CT such as BTCV, the Medical "
            "Segmentation Decathlon, TCIA collections and LIDC-IDRI). Labels are not used. Write a datalist in the "
            "Medical Segmentation Decathlon form, paths relative to `dataset_dir`:\n\n"
            "```json\n{\"training\": [{\"image\": \"imagesTr/ct_000.nii.gz\"}, ...],\n"
            " \"validation\": [{\"image\": \"imagesTr/ct_100.nii.gz\"}, ...],\n"
            " \"testing\": [{\"image\": \"imagesTs/ct_200.nii.gz\"}, ...]}\n```\n\n"
            "The collection's `tools/data/prepare_datalist.py` writes it as `<dataset_dir>/datalist.json` (the default "
            "`data_list_file_path`; an absolute path also works):\n\n"
            "```bash\npython tools/data/prepare_datalist.py pool /data/ct_a /data/ct_b --dataset_dir /data --val_fraction 0.05\n```"
        )
        preprocessing = (
            "Load, reorient to RAS, resample to 1.5 × 1.5 × 2.0 mm (bilinear), window -1000..1000 HU to [0, 1] "
            "(clipped), crop to the body (non-zero after windowing), pad to at least the crop size. "
            "These steps are cached (`CacheDataset`, `cache_rate`)."
        )
    else:
        data = (
            "BraTS 2020 multimodal MRI (T1, T1ce, T2, FLAIR; 1 mm isotropic, skull-stripped). Task-specific mode: "
            "pretrain on the BraTS training split (80 %), then finetune on the same split with "
            "`hybridmim_" + spec.backbone + "_brats`. Labels are not used here. Datalist (MSD form, paths relative to "
            "`dataset_dir`), the four modality files stacked as channels in this order:\n\n"
            "```json\n{\"training\": [{\"image\": [\"BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz\",\n"
            "                            \"..._t1ce.nii.gz\", \"..._t2.nii.gz\", \"..._flair.nii.gz\"]}, ...],\n"
            " \"validation\": [...], \"testing\": [...]}\n```\n\n"
            "The collection's `tools/data/prepare_datalist.py` writes it as `<dataset_dir>/datalist.json` (the default "
            "`data_list_file_path`; an absolute path also works):\n\n"
            "```bash\npython tools/data/prepare_datalist.py brats /data/BraTS2020\n```"
        )
        preprocessing = (
            "Load the 4 modalities as channels, reorient to RAS, resample to 1 mm (a no-op for BraTS), crop to the "
            "brain (non-zero voxels), z-score each channel over its non-zero voxels, pad to at least the crop size. "
            "These steps are cached (`CacheDataset`, `cache_rate`)."
        )
    finetune = ", ".join(f"`{b}`" for b in spec.finetune_bundles)
    return f"""# {spec.name}

## Overview

HybridMIM self-supervised pretraining of a MONAI `{spec.backbone_name}` on {"unlabeled CT (generic mode)" if spec.ct else "BraTS 2020 MRI (task-specific mode)"}.
Each {spec.roi}³ crop ({spec.in_channels} channel{"s" if spec.in_channels > 1 else ""}) is split into 32³ sub-volumes of 2×2×2 patches of 16³; 40 % of the patches are masked
(set to 0). The network is trained with five losses at once:

1. partial-region reconstruction: MSE on the masked voxels of the central {spec.region}³ region only (the decoder computes
   that region alone);
2. mask number: how many of the 8 patches of each sub-volume are masked (9-way classification);
3. mask location: which of the 8 patches are masked (8 binary labels);
4. consistency between the number and location heads;
5. dropout contrastive (SimCSE): two dropout views of each sample are positives, the other samples of the batch
   (gathered from all GPUs under DDP) negatives.

`L = L_rec + 0.1 L_num + 0.1 L_loc + 0.01 L_cons + 0.1 L_cl`. Both encoder and decoder are pretrained.
The result, `models/model.pt`, is the flat state dict of the `{spec.backbone_name}` backbone, ready for {finetune}.

## Data

{data}

See `docs/data_license.txt` for the terms of the datasets.

## Preprocessing

{preprocessing} Training then takes {2} random {spec.roi}³ crops per volume (`samples_per_volume`) and masks each one
(`HierarchicalMaskd`); there is no augmentation. Validation uses the central crop of each validation volume with the
same masks at every validation (seeded). Images smaller than the crop are zero-padded; padding is never counted as
masked (the mask is carried explicitly).

## Training configuration

| key | default | meaning |
|---|---|---|
| `roi_size` | [{spec.roi}, {spec.roi}, {spec.roi}] | crop size (multiple of `sub_volume_size`) |
| `region_size` | [{spec.region}, {spec.region}, {spec.region}] | reconstructed central region (set equal to `roi_size` for full reconstruction) |
| `sub_volume_size`, `patch_size`, `mask_ratio` | 32, 16, 0.4 | two-level masking |
| `{width_key}` | {width_default} | backbone width (the finetune bundles must use the same) |
| `batch_size` × `samples_per_volume` | {spec.batch_size} × 2 | crops per step and GPU ({spec.batch_size * 2}) |
| `learning_rate`, `weight_decay` | 1e-4, 1e-5 | AdamW |
| `warmup_steps` | 500 | linear warm-up, then cosine decay to 0, stepped every iteration |
| `steps_per_epoch` × `train#trainer#max_epochs` | {STEPS_PER_EPOCH} × {TOTAL_STEPS // STEPS_PER_EPOCH} | {TOTAL_STEPS:,} steps |
| `val_interval` | 5 | validate every 5 epochs ({5 * STEPS_PER_EPOCH} steps) |
| `amp` | true | mixed precision (CUDA only) |
| `amp_dtype` | float16 | autocast dtype with `amp`: `float16` or `bfloat16` (losses are computed in float32) |
| `cache_rate`, `cache_num` | 1.0, {CACHE_NUM} | volumes cached in memory after preprocessing: that share, at most `cache_num` per process (see Memory) |
| `check_data` | true | read every file of `training`/`validation` once before caching; stop naming every unusable one |
| `max_nonfinite_steps` | 20 | iterations in a row with a NaN/inf loss (their steps are skipped) after which the run stops |
| `resume` | false | continue from the most advanced full checkpoint in `ckpt_dir` |
| `loss` | paper weights | `hybridmim_components.HybridMIMLoss` |

Logged every iteration (console and TensorBoard in `output_dir`): the total loss and each term
(`train_reconstruction`, `train_number`, `train_location`, `train_consistency`, `train_contrastive`) and the learning
rate `lr`; a progress bar shows the iteration within the epoch. Validation metrics: `val_recon_mse` (MSE on the masked
voxels of the region; key metric, lower is better), `val_number_acc`, `val_location_acc` (per patch), each beside its
trivial baseline on the same crops and masks (`val_recon_mse_baseline`: every masked voxel predicted by the mean of
the crop's visible voxels; `val_number_acc_baseline`: always the most frequent count; `val_location_acc_baseline`:
always the majority state), plus a preview image (masked input | reconstruction | original, middle axial slice) in
TensorBoard.

Saved in `ckpt_dir` (default `models/`): `model.pt` (backbone only, best `val_recon_mse`), `pretrain_network.pt`
(backbone and heads, same epoch; used by `evaluate.json`), and full training checkpoints `checkpoint_epoch=N.pt` /
`checkpoint_final.pt` (network, optimizer, lr scheduler, trainer state, random states) for `resume`.
{RESUME_GUARANTEE}

To share the weights as a bundle (a zip `python -m monai.bundle download --url ...` accepts, with the SHA-256 of
`models/model.pt` in `large_files.yml`), run `python tools/bundles/pack_bundle.py bundles/{spec.name} --version X.Y.Z` from the
HybridMIM Bundles repository; a finetune bundle's `pretrained_path` takes the downloaded folder and checks the hash.

## Memory

GPU: the dominant cost is the encoder on {spec.roi}³ crops run twice (two dropout views, stacked) with the decoder on
the {spec.region}³ region only. To lower it: reduce `batch_size`, enable
{"`network_def#use_checkpoint` (gradient checkpointing) or " if spec.backbone == "swin" else ""}`amp`.

Host: the preprocessed volumes are cached in memory as float32 (`CacheDataset`). {_memory_text(spec)} Each process
therefore caches at most `cache_num` = {CACHE_NUM} volumes (the others are preprocessed on the fly by the data loader
workers, a few seconds each), and under DDP (`multi_gpu_train.json`) each process caches only its share of the
`training` and `validation` lists (`monai.data.partition_dataset`), not all of them: 8 GPUs cache up to
{8 * CACHE_NUM:,} volumes. Raise `cache_num` when memory allows; lower it (or `cache_rate`) when not. At start,
`check_data` reads every file once (about 0.25 s for a generated 512 × 512 × 200 `.nii.gz`, more for real scans, which
compress less; spread over the DDP processes); `--check_data false` skips it for a pool you trust.
{pool.readme_paragraph(spec)}
## Performance

{performance_section(spec.name)}
## Commands

Train (single GPU):

```bash
python -m monai.bundle run --config_file configs/train.json --dataset_dir /path/to/data
```

Resume an interrupted run from the most advanced checkpoint in `ckpt_dir`:

```bash
python -m monai.bundle run --config_file configs/train.json --dataset_dir /path/to/data --resume true
```

Multi-GPU (DDP; falls back to gloo on CPU; per-GPU batch as above, contrastive negatives gathered over GPUs):

```bash
torchrun --standalone --nnodes=1 --nproc_per_node=8 -m monai.bundle run \\
    --config_file "['configs/train.json','configs/multi_gpu_train.json']" --dataset_dir /path/to/data
```

Evaluate the pretext metrics of `models/model.pt` on the validation list (written to `output_dir/metrics.csv`):

```bash
python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" --dataset_dir /path/to/data
```

Inference: mask each `testing` volume (seeded) and write the masked crop and the reconstruction of the region side
by side as `output_dir/<case>/<case>_masked.nii.gz` and `<case>_reconstruction.nii.gz` (same world coordinates):

```bash
python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/data
```

A quick CPU smoke test with a tiny network: add `{small} --roi_size '[64,64,64]' --region_size '[32,32,32]'
--steps_per_epoch 2 --train#trainer#max_epochs 1 --train#dataloader#num_workers 0 --amp false`.

## Using the pretrained weights in the finetuning bundles

`models/model.pt` has the same key names as the finetuning bundles' `network_def` (same `{width_key}`); only the last
1×1×1 layer is missing and is initialised fresh:

```bash
cd ../{spec.finetune_bundles[0]}
python -m monai.bundle run --config_file configs/train.json --dataset_dir /path/to/task \\
    --pretrained_path ../{spec.name}/models/model.pt
```

The finetuning bundles refuse to start when anything but the last layer is missing or mis-shaped.
{public_weights_section(spec.backbone == "swin", pretraining=True)}
## References

- Xing, Z., Zhu, L., Yu, L., Xing, Z., Wan, L. Hybrid Masked Image Modeling for 3D Medical Image Segmentation. IEEE
  Journal of Biomedical and Health Informatics, 2024. arXiv:2303.10333 (HybridMIM).
- {"Hatamizadeh, A. et al. Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI Images. BrainLes 2021." if spec.backbone == "swin" else "Falk, T. et al. U-Net: deep learning for cell counting, detection, and morphometry. Nature Methods 16, 2019 (MONAI BasicUNet)."}
- Gao, T. et al. SimCSE: Simple Contrastive Learning of Sentence Embeddings. EMNLP 2021.

## License

Code and configuration: Apache License 2.0 (see `LICENSE`). Weights trained with this bundle inherit the terms of
the data used: see `docs/data_license.txt`.
"""


CT_LICENSE = """Third-party data used by this bundle
====================================

This bundle ships no images and no trained weights. Weights you train with it are derived from the data you use and
inherit its terms. The summaries below are our own and are not legal advice: read the terms on each original site
before downloading, and cite the datasets as their providers ask.

Generic pretraining uses a pool of public CT collections, for example:

- BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen), hosted on Synapse
  (https://www.synapse.org/#!Synapse:syn3193805). Access requires a Synapse account and agreeing to the challenge's
  data use terms; the data are for research use.
- Medical Segmentation Decathlon (http://medicaldecathlon.com/): released under CC BY-SA 4.0; attribution is
  required and derived datasets must be shared alike.
- The Cancer Imaging Archive collections (https://www.cancerimagingarchive.net/), including LIDC-IDRI: each
  collection states its own licence (many are CC BY 3.0 or CC BY 4.0, some have restricted or non-commercial terms)
  and TCIA's data usage policy asks users to cite the collection and TCIA.

Check the licence of every collection you add to the pool. Non-commercial or share-alike terms of any source apply
to the weights trained on it.
"""

BRATS_LICENSE = """Third-party data used by this bundle
====================================

This bundle ships no images and no trained weights. Weights you train with it are derived from the data you use and
inherit its terms. The summary below is our own and is not legal advice: read the terms on the original site before
downloading.

BraTS 2020 (Multimodal Brain Tumor Segmentation Challenge 2020), https://www.med.upenn.edu/cbica/brats2020/data.html
- Obtained by registering with the challenge organisers (CBICA, University of Pennsylvania); the data are provided
  for research and the challenge, not for clinical or commercial use.
- Publications using the data must cite the BraTS reference papers listed on the challenge site (Menze et al., IEEE
  TMI 2015; Bakas et al., Scientific Data 2017; Bakas et al., arXiv:1811.02629) and, where applicable, the TCIA
  TCGA-GBM/TCGA-LGG segmentation labels.
- Redistribution of the images is not permitted by this bundle; each user obtains the data from the organisers.
"""


def bundles() -> dict:
    """``{bundle_name: {relative_path: content}}`` for the four pretraining bundles."""
    result = {}
    for spec in SPECS:
        train = _train_config(spec)
        result[spec.name] = {
            "configs/train.json": train,
            "configs/multi_gpu_train.json": _multi_gpu_config(train),
            "configs/evaluate.json": _evaluate_config(spec),
            "configs/inference.json": _inference_config(spec, train),
            "configs/metadata.json": _metadata(spec),
            "docs/README.md": _readme(spec),
            "docs/data_license.txt": CT_LICENSE if spec.ct else BRATS_LICENSE,
        }
        if pool.applies(spec):
            result[spec.name][pool.POOL_STORE_FILE] = pool.pool_store_config()
    return result
