"""Public SwinUNETR checkpoints: recognise their layout from the keys and rename them to MONAI's parameter names.

Every group that published 3D SwinUNETR weights saved them its own way: another wrapper key (``state_dict``,
``net``, ``model``), another prefix (``module.``, ``backbone.``, ``encoder.``), another nesting (``layers1.0.0.``),
timm's MLP names (``mlp.fc1``) instead of MONAI's (``mlp.linear1``), and pretext heads beside the network. A loader
that strips ``module.`` and calls ``load_state_dict(strict=False)`` loads nothing from most of them and says nothing.
This module names the layout of a checkpoint (:func:`detect_layout`) and converts it into a flat state dict in
MONAI's own ``SwinUNETR`` (or ``BasicUNet``) names (:func:`convert_checkpoint`), listing what it dropped; the loader
(:mod:`hybridmim_components.weights.transfer`) then reports what loaded into the network.

Each :class:`Layout` also records what a user must match to get what the weights computed in training: what part of
the network they cover, the patch-merging order they were trained with (all public SwinUNETR weights known here
predate MONAI 1.5's fix of ``PatchMerging``: ``"merging_legacy"``), and the preprocessing the publishers' code
applies (fields a publisher did not state are ``None``). ``preprocessing`` uses the fields of a provenance record
(:mod:`hybridmim_components.weights.provenance`: ``orientation``, ``spacing``, ``intensity``, ``crop``); the network
settings live in ``architecture``.

The facts in :data:`LAYOUTS` come from the publishers' code; each layout's ``sources`` names the files read.

How a file was identified matters as much as what it was taken for (:attr:`ConvertedCheckpoint.identified_by`):
``"hash"``: its digest is a published file's (:data:`KNOWN_FILE_HASHES`), so it *is* that file; ``"keys"``: names no
other layout uses (a pretext head, a prefix, a nesting); ``"shapes"``: only tensor shapes decide (e.g. a bare
SwinUNETR of width 48 with 14 outputs: the model zoo's BTCV file, or one's own BTCV finetune), a guess that the notes
say is one, with how to state the truth (a provenance record beside the file, or ``--downsample``).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from hybridmim_components.weights.provenance import provenance_path
from hybridmim_components.weights.provenance import window_intensity as _window  # the record's CT window

__all__ = [
    "Layout",
    "ConvertedCheckpoint",
    "LAYOUTS",
    "KNOWN_FILE_HASHES",
    "known_file",
    "merging_source",
    "detect_layout",
    "convert_checkpoint",
    "infer_architecture",
    "coverage",
    "unwrap_checkpoint",
]

# the top-level modules of MONAI's SwinUNETR and BasicUNet: a converted state dict holds only names below these
SWIN_UNETR_MODULES = (
    "swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
    "decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out",
)
SWIN_ENCODER_MODULES = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10")  # the skip/bottleneck blocks
SWIN_DECODER_MODULES = ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1")
BASIC_UNET_MODULES = (
    "conv_0", "down_1", "down_2", "down_3", "down_4", "upcat_4", "upcat_3", "upcat_2", "upcat_1", "final_conv",
)
# where a checkpoint keeps its state dict, in the order looked at (training scripts save optimizer and epoch beside)
WRAPPER_KEYS = ("state_dict", "model", "net", "network")




def _frozen(d: Mapping | None) -> Mapping:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Layout:
    """How one family of public checkpoints is stored, and what it was trained with.

    Attributes:
        name: identifier used in logs and configs, e.g. ``"tang_ssl_swinvit"``.
        title: human name for logs and the README.
        covers: what the published files hold: ``"swin_encoder"`` (``swinViT`` only), ``"encoder"`` (``swinViT`` and
            the skip blocks ``encoder1..4``, ``encoder10``) or ``"all"`` (the whole SwinUNETR including the decoder;
            ``out`` may be absent or a pretext head).
        merging: ``"merging_legacy"`` when the weights were trained with the patch-merging order of MONAI < 1.5 (or a
            copy of it), ``"merging"`` for MONAI's current order.
        url: where the weights are published (``""`` when nowhere).
        licence: the licence the publisher states (for the weights where stated, else for the repository).
        preprocessing: what the publisher's pretraining code applies, in provenance-record fields: ``orientation``
            (axcodes), ``spacing`` (mm, ``None`` when the code does not resample), ``intensity`` (``{"kind":
            "window", a_min, a_max, b_min, b_max, clip}``) and ``crop`` (training patch, voxels). ``None``: not
            published.
        architecture: the published network settings: ``backbone``, ``feature_size`` (a tuple when several sizes
            were published), ``in_channels``, ``use_v2``, ``out_channels`` (of the file's ``out``, ``None`` when it
            has none).
        notes: what a user must know or what is uncertain.
        sources: the public files the facts come from (``owner/repo:path``).
    """

    name: str
    title: str
    covers: str
    merging: str
    url: str
    licence: str
    preprocessing: Mapping = field(default_factory=dict)
    architecture: Mapping = field(default_factory=dict)
    notes: str = ""
    sources: tuple[str, ...] = ()


@dataclass
class ConvertedCheckpoint:
    """The result of :func:`convert_checkpoint`; unpacks as ``layout, state_dict, dropped = convert_checkpoint(c)``.

    Attributes:
        layout: the recognised :class:`Layout`.
        state_dict: flat ``{name: tensor}`` in MONAI ``SwinUNETR`` (or ``BasicUNet``) names; the tensors are the
            file's own (not copied).
        dropped: names in the file (after unwrapping, ``module.`` stripped) with no counterpart in the network:
            pretext heads, a final norm, a mask token; sorted.
        covers: what ``state_dict`` actually covers (:func:`coverage`), which can be less than ``layout.covers``.
        architecture: :func:`infer_architecture` of ``state_dict``.
        notes: warnings about this file (e.g. a patch embedding MONAI cannot take, a layout that is a guess).
        identified_by: ``"hash"`` (a published file's digest), ``"keys"`` (names only that layout has) or
            ``"shapes"`` (only shapes decide: a guess).
        digest: ``"<hash type> <hex>"`` of the file when a known digest identified it, else ``None``.
        not_converted: network names the file holds in a form they cannot be converted from (the DAE code's
            convolution stem for ``swinViT.patch_embed.proj.*``): absent from ``state_dict``; sorted.
    """

    layout: Layout
    state_dict: dict[str, torch.Tensor]
    dropped: list[str]
    covers: str
    architecture: dict
    notes: list[str] = field(default_factory=list)
    identified_by: str = "keys"
    digest: str | None = None
    not_converted: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator:
        return iter((self.layout, self.state_dict, self.dropped))


_SWIN_ARCH_48 = {"backbone": "SwinUNETR", "feature_size": 48, "in_channels": 1, "use_v2": False}

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            name="tang_ssl_swinvit",
            title="SwinUNETR self-supervised Swin encoder (Tang et al., CVPR 2022; model_swinvit.pt)",
            covers="swin_encoder",
            merging="merging_legacy",
            url="https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt",
            licence="Apache-2.0 (Project-MONAI/research-contributions; no separate licence for the weights)",
            preprocessing=_frozen({"orientation": "RAS", "spacing": None, "intensity": _window(-1000, 1000),
                                   "crop": [96, 96, 96]}),
            architecture=_frozen({**_SWIN_ARCH_48, "out_channels": None}),
            notes="Covers swinViT only (the skip blocks and decoder start fresh). The file has a final LayerNorm "
            "(norm.*) that MONAI's SwinTransformer lacks: dropped. The pretraining code applies no Spacingd "
            "(its --space_x/y/z arguments are unused); the data were not resampled by the published code.",
            sources=(
                "Project-MONAI/research-contributions:SwinUNETR/Pretrain/README.md",
                "Project-MONAI/research-contributions:SwinUNETR/Pretrain/main.py",
                "Project-MONAI/research-contributions:SwinUNETR/Pretrain/utils/data_utils.py",
                "Project-MONAI/MONAI:monai/networks/nets/swin_unetr.py (SwinUNETR.load_from)",
            ),
        ),
        Layout(
            name="tang_ssl_head",
            title="SwinUNETR self-supervised pretraining network with its heads (Tang et al.; SSLHead checkpoint, "
            "e.g. self_supervised_nv_swin_unetr_5050.pt)",
            covers="swin_encoder",
            merging="merging_legacy",
            url="https://huggingface.co/MrGiovanni/SuPreM/resolve/main/self_supervised_nv_swin_unetr_5050.pt",
            licence="Apache-2.0 (Project-MONAI/research-contributions)",
            preprocessing=_frozen({"orientation": "RAS", "spacing": None, "intensity": _window(-1000, 1000),
                                   "crop": [96, 96, 96]}),
            architecture=_frozen({**_SWIN_ARCH_48, "out_channels": None}),
            notes="The whole SSLHead of the pretraining script: swinViT (spelled swin_vit before "
            "research-contributions PR #88, Aug 2022) plus rotation_head, contrastive_head and the reconstruction "
            "conv (dropped). The file's layout is inferred from the training code and SuPreM's loader, not from "
            "the file itself.",
            sources=(
                "Project-MONAI/research-contributions:SwinUNETR/Pretrain/models/ssl_head.py",
                "Project-MONAI/research-contributions:SwinUNETR/Pretrain/main.py",
                "MrGiovanni/SuPreM:target_applications/totalsegmentator/train.py",
            ),
        ),
        Layout(
            name="model_zoo_swin_unetr_btcv",
            title="MONAI model zoo swin_unetr_btcv_segmentation (supervised, BTCV 13 organs + background)",
            covers="all",
            merging="merging_legacy",
            url="https://developer.download.nvidia.com/assets/Clara/monai/tutorials/model_zoo/"
            "model_swin_unetr_btcv_segmentation_v1.pt",
            licence="Apache-2.0 (bundle LICENSE; the BTCV data terms are in its docs/data_license.txt)",
            preprocessing=_frozen({"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "intensity": _window(-175, 250),
                                   "crop": [96, 96, 96]}),
            architecture=_frozen({**_SWIN_ARCH_48, "out_channels": 14}),
            notes="A bare SwinUNETR state dict recognised by its 14-channel out (feature size 48, 1 input "
            "channel, no use_v2); a finetune of one's own to 14 classes has the same keys: a provenance record "
            "beside the file, or KNOWN_FILE_HASHES, tells them apart. Trained with MONAI 1.3.x (bundle 0.5.4).",
            sources=(
                "Project-MONAI/model-zoo:models/swin_unetr_btcv_segmentation/configs/train.json",
                "Project-MONAI/model-zoo:models/swin_unetr_btcv_segmentation/configs/metadata.json",
                "Project-MONAI/model-zoo:models/swin_unetr_btcv_segmentation/large_files.yml",
                "Project-MONAI/model-zoo:models/swin_unetr_btcv_segmentation/LICENSE",
            ),
        ),
        Layout(
            name="voco",
            title="VoCo self-supervised SwinUNETR-v2 encoder (Wu et al., CVPR 2024 / TPAMI; VoCo_{B,L,H}_SSL_head.pt)",
            covers="encoder",
            merging="merging_legacy",
            url="https://huggingface.co/Luffy503/VoCo",
            licence="Apache-2.0 (Luffy03/Large-Scale-Medical and Luffy03/VoCo LICENSE)",
            preprocessing=_frozen({"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "intensity": _window(-175, 250),
                                   "crop": [64, 64, 64]}),
            architecture=_frozen({"backbone": "SwinUNETR", "feature_size": (48, 96, 192), "in_channels": 1,
                                  "use_v2": True, "out_channels": None}),
            notes="The published VoCo_*_SSL_head.pt hold the bare encoder in MONAI names (145 tensors: swinViT "
            "with layers1c..4c (use_v2), encoder1..4, encoder10; no student/teacher heads, per "
            "Luffy03/Large-Scale-Medical issues #14 and #40); checkpoints of voco_train.py hold [module.]backbone.* "
            "plus the student/teacher projection heads (dropped). No decoder. Feature size 48 (B), 96 (L), "
            "192 (H). Trained with "
            "monai==1.3.0. Spacing and crop are the pretraining script's defaults; some datasets use their own "
            "spacing (utils/data_trans.py).",
            sources=(
                "Luffy03/Large-Scale-Medical:README.md",
                "Luffy03/Large-Scale-Medical:Self-supervised/models/voco_head.py",
                "Luffy03/Large-Scale-Medical:Self-supervised/voco_train.py",
                "Luffy03/Large-Scale-Medical:Downstream/monai/BTCV/models/models.py",
                "Luffy03/Large-Scale-Medical:requirements.txt",
                "https://github.com/Luffy03/Large-Scale-Medical/issues/40",
            ),
        ),
        Layout(
            name="vocomni",
            title="VoComni omni-supervised SwinUNETR-v2 (Wu et al., TPAMI; VoComni_{B,L,H}.pt)",
            covers="all",
            merging="merging_legacy",
            url="https://huggingface.co/Luffy503/VoCo",
            licence="Apache-2.0 (Luffy03/Large-Scale-Medical LICENSE)",
            preprocessing=_frozen({"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "intensity": _window(-175, 250),
                                   "crop": [64, 64, 64]}),
            architecture=_frozen({"backbone": "SwinUNETR", "feature_size": (48, 96, 192), "in_channels": 1,
                                  "use_v2": True, "out_channels": 21}),
            notes="A bare SwinUNETR-v2 with a 21-class out (the README's loader matches plain MONAI names), or, as "
            "voco_train.py saves it, backbone.<the same> plus student/teacher heads (dropped). The published "
            "file's exact keys are inferred from the README and the training code.",
            sources=(
                "Luffy03/Large-Scale-Medical:Omni-supervised/models/voco_head.py",
                "Luffy03/Large-Scale-Medical:Omni-supervised/voco_train.py",
                "Luffy03/Large-Scale-Medical:Omni-supervised/utils/data_utils_omni.py",
            ),
        ),
        Layout(
            name="suprem_swin",
            title="SuPreM supervised SwinUNETR (Li et al., ICLR 2024; supervised_suprem_swinunetr_2100.pth; also "
            "the CLIP-Driven Universal Model's file)",
            covers="all",
            merging="merging_legacy",
            url="https://huggingface.co/MrGiovanni/SuPreM/resolve/main/supervised_suprem_swinunetr_2100.pth",
            licence="CC BY-NC-ND 4.0 (MrGiovanni/SuPreM LICENSE: non-commercial, no derivatives)",
            preprocessing=_frozen({"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "intensity": _window(-175, 250),
                                   "crop": [96, 96, 96]}),
            architecture=_frozen({**_SWIN_ARCH_48, "out_channels": None}),
            notes="{'net': module.backbone.<SwinUNETR without out>} plus the Universal-model heads (precls_conv, "
            "GAP, controller, organ_embedding, text_to_vision: dropped). SuPreM's SwinUNETR copies MONAI 0.9's, "
            "with the pre-1.5 patch-merging order. The licence forbids derivatives: check before sharing a finetune.",
            sources=(
                "MrGiovanni/SuPreM:supervised_pretraining/backbone/Universal_model.py",
                "MrGiovanni/SuPreM:supervised_pretraining/backbone/swinunetr.py",
                "MrGiovanni/SuPreM:supervised_pretraining/train.py",
                "MrGiovanni/SuPreM:supervised_pretraining/dataset/dataloader_bdmap.py",
                "MrGiovanni/SuPreM:README.md",
                "MrGiovanni/SuPreM:LICENSE",
            ),
        ),
        Layout(
            name="dae_swin",
            title="Disruptive Autoencoders SwinUNETR (Valanarasu et al., MIDL 2024; 50k CT/MRI, "
            "self_supervised_nv_swin_unetr_50000.pth)",
            covers="all",
            merging="merging_legacy",
            url="https://developer.download.nvidia.com/assets/Clara/monai/tutorials/dae_weights_midl_2024/"
            "DAE_SSL_WEIGHTS.zip",
            licence="Apache-2.0 (Project-MONAI/research-contributions; no separate licence for the weights)",
            preprocessing=_frozen({"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "intensity": _window(-1000, 1000),
                                   "crop": [96, 96, 96]}),
            architecture=_frozen({**_SWIN_ARCH_48, "out_channels": 1}),
            notes="{'model': encoder.<Swin, layersN.0.0. nested, mlp.fc1/fc2>, encoder1..4, encoder10, decoder1..5, "
            "out (1-channel reconstruction)}; encoder.mask_token and encoder.norm are dropped. The CT window is "
            "for CT; MRI volumes were z-scored (NormalizeIntensityd nonzero, channel_wise). Also mirrored at "
            "huggingface.co/MrGiovanni/SuPreM. The DAE pretraining code's patch embedding is a convolution stem "
            "(patch_embed.proj = MONAI UnetBasicBlock: conv1 3x3x3 stride 2, instance norm, LeakyReLU, conv2 "
            "3x3x3, instance norm, LeakyReLU), which MONAI's PatchEmbed (one 2x2x2 stride-2 convolution) cannot "
            "compute: files with it cover everything but swinViT.patch_embed (ConvertedCheckpoint.not_converted); "
            "pretrained_scope 'encoder' loads them with a fresh PatchEmbed and says so, 'all' stops.",
            sources=(
                "Project-MONAI/research-contributions:DAE/BTCV_Finetune/README.md",
                "Project-MONAI/research-contributions:DAE/BTCV_Finetune/swin_unetr_og.py",
                "Project-MONAI/research-contributions:DAE/Pretrain_full_contrast/models/simmim_advanced.py",
                "Project-MONAI/research-contributions:DAE/Pretrain_full_contrast/models/swin_transformer_3d.py",
                "Project-MONAI/research-contributions:DAE/Pretrain_full_contrast/data/data_pretrain.py",
                "MrGiovanni/SuPreM:target_applications/totalsegmentator/train.py",
            ),
        ),
        Layout(
            name="hybridmim_authors",
            title="HybridMIM authors' SwinUNETR pretraining checkpoint (Xing et al.; ge-xing/HybridMIM)",
            covers="all",
            merging="merging_legacy",
            url="https://github.com/ge-xing/HybridMIM",
            licence="Apache-2.0 (ge-xing/HybridMIM LICENSE)",
            preprocessing=_frozen({"orientation": "RAS", "spacing": None,
                                   "intensity": _window(-1000, 1000, 0.001, 1.0), "crop": [96, 96, 96]}),
            architecture=_frozen({**_SWIN_ARCH_48, "feature_size": (24, 48), "out_channels": 1}),
            notes="module.<MONAI SwinUNETR names, out = 1-channel reconstruction> plus pred_mask_region, "
            "contrast_learning_head, pred_mask_region_position (dropped). No weights are published; the layout is "
            "that of the authors' training script. Their SwinUNETR copies the pre-1.5 patch-merging order; their "
            "transforms do not resample (no Spacingd) and scale to [0.001, 1].",
            sources=(
                "ge-xing/HybridMIM:Pretrain/pretrain_models/swinunetr.py",
                "ge-xing/HybridMIM:Pretrain/main.py",
                "ge-xing/HybridMIM:Pretrain/utils/data_utils.py",
            ),
        ),
        Layout(
            name="hybridmim_bundle",
            title="MONAI SwinUNETR/BasicUNet state dict (a HybridMIM bundle's models/model.pt, or any file in "
            "MONAI's own names)",
            covers="all",
            merging="merging",
            url="",
            licence="that of the bundle (its LICENSE)",
            preprocessing=_frozen({"orientation": None, "spacing": None, "intensity": None, "crop": None}),
            architecture=_frozen({"backbone": None}),
            notes="A flat state dict in MONAI's names (module./backbone. prefixes and a model/state_dict/network "
            "wrapper allowed: a whole pretraining network keeps only its backbone). Preprocessing and merging "
            "order come from the provenance record beside the file (models/model.provenance.json), which wins "
            "over the defaults here. Without one the merging order is not known from the keys: a file in MONAI's "
            "names trained with MONAI < 1.5 (e.g. another group's bare SwinUNETR) needs merging_legacy.",
            sources=("this project: hybridmim_components/workflow/checkpoints.py",),
        ),
    )
}

#: Digests of published files, ``(hash type, hex digest) -> layout``: a file with one of them *is* that publisher's
#: file (checked before any guess from shapes). Only digests a publisher states are listed (no SHA-256 is published
#: for the zoo's file; its large_files.yml gives md5).
KNOWN_FILE_HASHES = {
    ("md5", "50dd67a01b28a1d5487fd9ac27e682fb"): "model_zoo_swin_unetr_btcv",  # model-zoo large_files.yml, v1 file
}


def known_file(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[str, str] | None:
    """``(layout name, "<hash type> <hex>")`` when the file's digest is one of :data:`KNOWN_FILE_HASHES`, else
    ``None``. Every hash type the table uses is computed in one read of the file."""
    kinds = sorted({kind for kind, _ in KNOWN_FILE_HASHES})
    if not kinds:
        return None
    hashes = {kind: hashlib.new(kind) for kind in kinds}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            for h in hashes.values():
                h.update(block)
    for kind, h in hashes.items():
        name = KNOWN_FILE_HASHES.get((kind, h.hexdigest()))
        if name is not None:
            return name, f"{kind} {h.hexdigest()}"
    return None


def merging_source(converted: ConvertedCheckpoint | None, record: Mapping | None,
                   record_file: str | None = None) -> tuple[str | None, str | None]:
    """The patch-merging order weights were trained with, and where that comes from; ``(None, None)`` when nothing
    states it (a file in MONAI's names without a record, or a layout guessed from shapes).

    In this order: the provenance record beside the file (``record``, read from ``record_file``); a published
    file's known digest; a published layout recognised from its keys (the order its publishers trained with).
    """
    if record and record.get("downsample"):
        return record["downsample"], f"the provenance record {record_file or 'beside the weights'}"
    if converted is None or converted.layout.name == "hybridmim_bundle":
        return None, None
    if converted.identified_by == "hash":
        return converted.layout.merging, f"the published file's {converted.digest} ({converted.layout.name})"
    if converted.identified_by == "keys":
        return converted.layout.merging, (f"the published layout {converted.layout.name}, recognised from its keys "
                                          "(the order its publishers trained with)")
    return None, None


def unwrap_checkpoint(checkpoint: Mapping, wrapper_keys: tuple[str, ...] = WRAPPER_KEYS,
                      prefixes: tuple[str, ...] = ("module.",)) -> tuple[str | None, dict[str, torch.Tensor]]:
    """The wrapper key (``None`` for a bare state dict) and the flat ``{name: tensor}`` with ``prefixes`` stripped.

    Looks into ``wrapper_keys`` (default ``state_dict``/``model``/``net``/``network``; repeatedly) until a mapping
    holds tensors; non-tensor entries are ignored. Leading ``prefixes`` are stripped, repeatedly and in any order
    (DDP around a pretraining wrapper stacks them); by default only ``module.`` (DDP): other prefixes are
    layout-specific.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must be a mapping (a state dict or a dict holding one), got "
                         f"{type(checkpoint).__name__}.")
    state, wrapper = checkpoint, None
    while not any(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in wrapper_keys if isinstance(state.get(k), Mapping)), None)
        if key is None:
            raise ValueError(
                f"no state dict found in the checkpoint: expected tensors or one of the keys {wrapper_keys}, "
                f"got keys {list(state)[:10]}."
            )
        state, wrapper = state[key], key if wrapper is None else wrapper
    flat = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            while prefix := next((p for p in prefixes if name.startswith(p)), None):
                name = name[len(prefix):]
            flat[name] = value
    return wrapper, flat


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _has_prefix(names, *prefixes: str) -> bool:
    return any(n.startswith(prefixes) for n in names)


_FC = re.compile(r"\.mlp\.fc([12])\.")


def _swin_name(rest: str) -> str:
    """A name below ``swinViT.`` in MONAI's spelling: timm's ``mlp.fc1/fc2`` -> MONAI's ``mlp.linear1/linear2``."""
    return _FC.sub(lambda m: f".mlp.linear{m.group(1)}.", "." + rest)[1:]


_UNIVERSAL_HEADS = ("precls_conv.", "GAP.", "controller.", "organ_embedding", "text_to_vision.")
_HYBRIDMIM_AUTHOR_HEADS = ("pred_mask_region.", "contrast_learning_head.", "pred_mask_region_position.")
_TANG_HEADS = ("rotation_head.", "rotation_pre.", "contrastive_head.", "contrastive_pre.")


def _detect(wrapper: str | None, names: list[str]) -> str | None:
    """The layout name for ``names`` (``module.`` stripped), or ``None``."""
    if _has_prefix(names, "encoder.layers1.0.0.", "encoder.patch_embed."):
        return "dae_swin"
    if "patch_embed.proj.weight" in names and _has_prefix(names, "layers1.0.blocks."):
        return "tang_ssl_swinvit"
    if _has_prefix(names, "swin_vit.") or (_has_prefix(names, "swinViT.") and _has_prefix(names, *_TANG_HEADS)):
        return "tang_ssl_head"  # 'swin_vit' is the SSLHead's name for its encoder before research-contributions#88
    if _has_prefix(names, "backbone.swinViT."):
        if _has_prefix(names, *_UNIVERSAL_HEADS):
            return "suprem_swin"
        if _has_prefix(names, "student.", "teacher."):
            return "vocomni" if _has_prefix(names, "backbone.decoder1.") else "voco"
        plain = [n[len("backbone."):] for n in names if n.startswith("backbone.")]
        return _detect_plain(wrapper, plain)
    return _detect_plain(wrapper, names)


def _detect_plain(wrapper: str | None, names: list[str]) -> str | None:
    # names already in MONAI's spelling (possibly with heads beside them)
    if _has_prefix(names, "swinViT.", "swin_vit."):
        if _has_prefix(names, *_HYBRIDMIM_AUTHOR_HEADS):
            return "hybridmim_authors"
        if wrapper == "net":  # SuPreM's convention; its *_backbone.pth holds the bare SwinUNETR
            return "suprem_swin"
        return None  # decided with the shapes (model zoo or generic) by the caller
    if "conv_0.conv_0.conv.weight" in names and _has_prefix(names, "down_1."):
        return "hybridmim_bundle"
    return None


def _is_model_zoo_btcv(state: Mapping[str, torch.Tensor]) -> bool:
    out = state.get("out.conv.conv.weight")
    embed = state.get("swinViT.patch_embed.proj.weight")
    return (
        out is not None and embed is not None and out.shape[0] == 14 and embed.shape[0] == 48
        and embed.shape[1] == 1 and "decoder1.transp_conv.conv.weight" in state
        and not any(k.startswith("swinViT.layers1c.") for k in state)
    )


def _layout_name(checkpoint: Mapping) -> tuple[str, str | None, dict[str, torch.Tensor], str]:
    """``(layout name, wrapper key, flat state dict, "keys" or "shapes")``: what decided the layout."""
    wrapper, flat = unwrap_checkpoint(checkpoint)
    names = list(flat)
    name, how = _detect(wrapper, names), "keys"
    if name is None and _has_prefix(names, "swinViT.", "swin_vit.", "backbone.swinViT."):
        plain = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in flat.items()}
        if _is_model_zoo_btcv(plain):
            name, how = "model_zoo_swin_unetr_btcv", "shapes"  # a BTCV finetune of one's own has these shapes too
        elif any(k.startswith(("swinViT.layers1c.", "swin_vit.layers1c.")) for k in plain):
            # a bare SwinUNETR-v2: VoCo publishes its encoder so (VoCo_*_SSL_head.pt), VoComni the whole network
            # with its 21-class out; our bundles never build use_v2
            out = plain.get("out.conv.conv.weight")
            if "decoder1.transp_conv.conv.weight" not in plain:
                name, how = "voco", "shapes"
            elif out is not None and out.shape[0] == 21:
                name, how = "vocomni", "shapes"
            else:
                name = "hybridmim_bundle"
        else:
            name = "hybridmim_bundle"
    if name is None:
        shown = ", ".join(names[:8]) + (f", ... (+{len(names) - 8})" if len(names) > 8 else "")
        raise ValueError(
            f"unknown checkpoint layout ({len(names)} tensors{f' under {wrapper!r}' if wrapper else ''}; keys: "
            f"{shown}). Known layouts: {', '.join(LAYOUTS)}; expected e.g. 'swinViT.patch_embed.proj.weight' "
            "(MONAI SwinUNETR names), 'module.patch_embed.proj.weight' (Tang et al.'s model_swinvit.pt) or "
            "'backbone.swinViT.*' (VoCo, SuPreM)."
        )
    return name, wrapper, flat, how


def detect_layout(checkpoint: Mapping) -> Layout:
    """The :class:`Layout` of a checkpoint as ``torch.load`` returns it (any wrapper).

    Raises:
        ValueError: the keys match no known layout (the message shows the first keys and the known layouts).
    """
    return LAYOUTS[_layout_name(checkpoint)[0]]


def _convert_names(name: str, flat: Mapping[str, torch.Tensor]) -> tuple[dict, list[str], list[str], list[str]]:
    """Rename ``flat`` (``module.`` stripped) for layout ``name``: (state dict, dropped names, notes, network names
    the file holds in a form that cannot be converted)."""
    out, dropped, notes, origin = {}, [], [], {}

    def put(key: str, target: str) -> None:
        if target in out:  # e.g. both 'backbone.x' and 'x' in one file: which one is meant is not ours to guess
            raise ValueError(f"checkpoint keys {origin[target]!r} and {key!r} both map to {target!r}.")
        out[target], origin[target] = flat[key], key

    def keep_monai(key: str, target: str) -> None:
        top = _top(target)
        if top in ("swinViT", "swin_vit"):
            put(key, "swinViT." + _swin_name(target.split(".", 1)[1]))
        elif top in SWIN_UNETR_MODULES or top in BASIC_UNET_MODULES:
            put(key, target)
        else:
            dropped.append(key)

    for key in flat:
        if name == "tang_ssl_swinvit":
            # model_swinvit.pt: the SwinTransformer's own names, no swinViT. prefix; norm.* is a final LayerNorm
            if _top(key) in ("patch_embed", "layers1", "layers2", "layers3", "layers4"):
                put(key, "swinViT." + _swin_name(key))
            else:
                dropped.append(key)
        elif name == "dae_swin":
            if key.startswith("encoder.patch_embed."):
                rest = key[len("encoder."):]
                if rest.startswith("patch_embed.proj.") and rest not in ("patch_embed.proj.weight",
                                                                         "patch_embed.proj.bias"):
                    dropped.append(key)  # the DAE code's convolution stem: no MONAI PatchEmbed counterpart
                else:
                    put(key, "swinViT." + rest)
            elif re.match(r"encoder\.layers[1-4]\.0\.0\.", key):
                # SimMIM wraps each BasicLayer in one more ModuleList: layersN.0.0. -> layersN.0.
                rest = key[len("encoder."):]
                layer, _, _, tail = rest.split(".", 3)
                put(key, "swinViT." + _swin_name(f"{layer}.0.{tail}"))
            elif key.startswith("encoder."):
                dropped.append(key)  # mask_token, final norm
            else:
                keep_monai(key, key)
        else:
            # the other layouts already use MONAI's names, maybe below a pretraining wrapper's backbone. (VoCo,
            # SuPreM, our whole pretraining network); anything outside the network's modules is a head: dropped
            keep_monai(key, key[len("backbone."):] if key.startswith("backbone.") else key)
    not_converted = []
    if name == "dae_swin" and any(k.startswith("encoder.patch_embed.proj.conv") for k in flat):
        # conv-norm-LeakyReLU twice is no single linear strided convolution: no exact mapping exists
        not_converted = ["swinViT.patch_embed.proj.bias", "swinViT.patch_embed.proj.weight"]
        notes.append(
            "the file's patch embedding is the DAE pretraining code's convolution stem (encoder.patch_embed.proj: "
            "conv1 3x3x3 stride 2, instance norm, LeakyReLU, conv2 3x3x3, instance norm, LeakyReLU), which MONAI's "
            "PatchEmbed (one 2x2x2 stride-2 convolution) cannot compute: swinViT.patch_embed is not loaded and "
            "starts from random weights; everything after it (the Swin stages, skip blocks, decoder) is the file's, "
            "but was trained on the stem's output, not on this PatchEmbed's."
        )
    return out, sorted(dropped), notes, not_converted


def coverage(state_dict: Mapping[str, torch.Tensor]) -> str:
    """What a converted state dict covers: ``"all"`` (encoder and decoder), ``"encoder"`` (SwinUNETR: ``swinViT``
    and the skip blocks; BasicUNet: ``conv_0``, ``down_*``), ``"swin_encoder"`` (``swinViT`` only) or ``"none"``."""
    tops = {_top(k) for k in state_dict}
    if "swinViT" in tops:
        if set(SWIN_DECODER_MODULES) <= tops and set(SWIN_ENCODER_MODULES) <= tops:
            return "all"
        return "encoder" if set(SWIN_ENCODER_MODULES) <= tops else "swin_encoder"
    if {"conv_0", "down_1", "down_2", "down_3", "down_4"} <= tops:
        return "all" if {"upcat_4", "upcat_3", "upcat_2", "upcat_1"} <= tops else "encoder"
    return "none"


def convert_checkpoint(checkpoint: Mapping, path: str | os.PathLike | None = None) -> ConvertedCheckpoint:
    """Recognise a checkpoint's layout and rename it into MONAI ``SwinUNETR`` (or ``BasicUNet``) names.

    Args:
        checkpoint: what ``torch.load(path, weights_only=True)`` returned (any wrapper of :data:`WRAPPER_KEYS`).
        path: the file it was loaded from: its digest is looked up in :data:`KNOWN_FILE_HASHES` first (a published
            file is then known, not guessed); without it only keys and shapes decide.

    Returns:
        A :class:`ConvertedCheckpoint` (unpacks as ``layout, state_dict, dropped``): the state dict holds only names
        below SwinUNETR's (``swinViT``, ``encoder1..4``, ``encoder10``, ``decoder1..5``, ``out``) or BasicUNet's
        top-level modules, with the file's tensors; pretext heads and other names are listed in ``dropped``.

    Raises:
        ValueError: unknown layout (names the first keys).
    """
    name, _, flat, how = _layout_name(checkpoint)
    known = known_file(path) if path is not None else None
    digest = None
    if known is not None:
        name, digest = known
        how = "hash"
    state, dropped, notes, not_converted = _convert_names(name, flat)
    try:
        arch = infer_architecture(state)
    except ValueError:
        arch = {}
    layout = LAYOUTS[name]
    if how == "shapes":
        record = provenance_path(path) if path is not None else "<weights>.provenance.json"
        notes.append(
            f"recognised as {layout.title} ({name}) from its tensor names and shapes only: a guess"
            + (", its digest is not the published file's" if path is not None else ", the file was not hashed")
            + ". A network of one's own with the same backbone, width and outputs has the same keys and shapes "
            f"(e.g. a hybridmim_swin_btcv finetune). State the truth: put a provenance record beside the file "
            f"({record}, with its downsample), or, if it is the published file, set --downsample {layout.merging}. "
            "Until then the patch-merging order is not known and this network's is assumed."
        )
    return ConvertedCheckpoint(layout, state, dropped, coverage(state), arch, notes, how, digest, not_converted)


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The network settings a state dict in MONAI names was made with, read from tensor shapes.

    SwinUNETR: ``backbone``, ``feature_size`` and ``in_channels`` (``swinViT.patch_embed.proj.weight``: [fs, C,
    p, p, p]), ``patch_size``, ``use_v2`` (``swinViT.layers1c`` present), ``depths`` (blocks per stage),
    ``num_heads`` (``relative_position_bias_table``: [(2w-1)³, heads]), ``window_size``, ``out_channels`` (of
    ``out``, ``None`` when absent). BasicUNet: ``backbone``, ``in_channels``, ``out_channels`` (``None`` when
    ``final_conv`` is absent) and ``features`` (the 6 channel counts its constructor takes).

    Raises:
        ValueError: neither a SwinUNETR patch embedding nor a BasicUNet first convolution is present.
    """
    embed = state_dict.get("swinViT.patch_embed.proj.weight")
    if embed is not None:
        depths, heads, window = [], [], None
        for stage in range(1, 5):
            prefix = f"swinViT.layers{stage}.0.blocks."
            blocks = {k[len(prefix):].split(".", 1)[0] for k in state_dict if k.startswith(prefix)}
            depths.append(len(blocks))
            table = state_dict.get(f"{prefix}0.attn.relative_position_bias_table")
            heads.append(int(table.shape[1]) if table is not None else None)
            if table is not None and window is None:
                side = round(table.shape[0] ** (1 / 3))  # (2w-1)³ relative offsets in 3D
                window = (side + 1) // 2
        out = state_dict.get("out.conv.conv.weight")
        return {
            "backbone": "SwinUNETR",
            "feature_size": int(embed.shape[0]),
            "in_channels": int(embed.shape[1]),
            "patch_size": int(embed.shape[2]),
            "use_v2": any(k.startswith("swinViT.layers1c.") for k in state_dict),
            "depths": tuple(depths),
            "num_heads": tuple(heads),
            "window_size": window,
            "out_channels": int(out.shape[0]) if out is not None else None,
        }
    first = state_dict.get("conv_0.conv_0.conv.weight")
    if first is not None:
        def channels(key: str):
            t = state_dict.get(key)
            return int(t.shape[0]) if t is not None else None

        final = state_dict.get("final_conv.weight")
        features = (
            int(first.shape[0]),
            *(channels(f"down_{i}.convs.conv_0.conv.weight") for i in range(1, 5)),
            int(final.shape[1]) if final is not None else channels("upcat_1.convs.conv_1.conv.weight"),
        )
        return {
            "backbone": "BasicUNet",
            "in_channels": int(first.shape[1]),
            "out_channels": int(final.shape[0]) if final is not None else None,
            "features": features,
        }
    raise ValueError(
        "cannot infer the architecture: neither 'swinViT.patch_embed.proj.weight' (SwinUNETR) nor "
        f"'conv_0.conv_0.conv.weight' (BasicUNet) is in the state dict (keys: {list(state_dict)[:8]})."
    )
