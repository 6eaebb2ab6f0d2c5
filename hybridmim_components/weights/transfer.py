"""Pretrained-weight transfer into a finetuning network that fails loudly.

A HybridMIM pretraining run pretrains encoder *and* decoder; only the last 1×1×1 layer of the finetuning network
(as many channels as segmentation targets) starts from scratch. ``load_pretrained_weights`` therefore requires every
other parameter to load, and raises with a report (loaded / missing / unexpected / mis-shaped) otherwise, instead of
silently training from random weights.

``pretrained_path`` may also be a bundle folder (a pretraining bundle as ``python -m monai.bundle download``
unpacks it): its ``models/model.pt`` is loaded, after checking the file against the hash that the bundle's
``large_files.yml`` (``.yaml``/``.json``, the MONAI model zoo's format) lists for it.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "SCOPES",
    "adapt_input_channels",
    "network_merging",
    "PretrainedWeightsError",
    "WeightsHashError",
    "load_pretrained_weights",
    "extract_state_dict",
    "last_layer_prefixes",
    "resolve_weights_file",
    "verify_weights_hash",
    "file_hash",
    "BUNDLE_WEIGHTS",
    "LARGE_FILES_NAMES",
]

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "network", "net", "backbone")
_PREFIXES = ("module.", "backbone.")

BUNDLE_WEIGHTS = "models/model.pt"  # the weights of a bundle, relative to its root (MONAI bundle convention)
BUNDLE_METADATA = "configs/metadata.json"  # what makes a folder a bundle
LARGE_FILES_NAMES = ("large_files.yml", "large_files.yaml", "large_files.json")  # what download_large_files reads


class PretrainedWeightsError(ValueError):
    """Pretrained weights do not fit the network beyond its last layer; ``report`` holds the details."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


class WeightsHashError(ValueError):
    """A weights file's hash differs from the one its bundle's ``large_files`` manifest lists."""


def file_hash(path: str | os.PathLike, hash_type: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks (weights files can be hundreds of MB)."""
    h = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_entries(manifest: str) -> list:
    from monai.bundle import ConfigParser

    try:
        content = ConfigParser.load_config_file(manifest)
    except Exception as e:  # a YAML/JSON syntax error: name the file
        raise ValueError(f"cannot read the large-files manifest {manifest}: {e}") from e
    entries = content.get("large_files") if isinstance(content, Mapping) else None
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ValueError(
            f"{manifest}: expected a key 'large_files' holding a list of {{path, url, hash_val, hash_type}} entries "
            f"(the MONAI model zoo's large_files.yml format), got {type(content).__name__} "
            f"{list(content)[:5] if isinstance(content, Mapping) else content!r}."
        )
    return entries


def verify_weights_hash(bundle_dir: str | os.PathLike, relative: str = BUNDLE_WEIGHTS) -> str | None:
    """Check ``bundle_dir/relative`` against the hash its bundle's ``large_files`` manifest lists for it.

    Returns:
        ``"<hash_type> <digest>"`` when a manifest lists a hash for the file and it matches; ``None`` when the bundle
        has no manifest or the manifest lists no hash for the file (nothing to check against).

    Raises:
        WeightsHashError: the file's digest differs (names the file, the manifest and both digests).
        ValueError: a manifest that cannot be read, has no ``large_files`` list, or names an unknown ``hash_type``.
    """
    bundle_dir = os.fspath(bundle_dir)
    target = os.path.normpath(relative)
    weights = os.path.join(bundle_dir, relative)
    verified = None
    for name in LARGE_FILES_NAMES:
        manifest = os.path.join(bundle_dir, name)
        if not os.path.isfile(manifest):
            continue
        for entry in _manifest_entries(manifest):
            if os.path.normpath(str(entry.get("path", ""))) != target or not entry.get("hash_val"):
                continue
            hash_type, expected = str(entry.get("hash_type") or "md5").lower(), str(entry["hash_val"]).lower()
            # md5 is download_url's default when hash_type is left out; model zoo bundles list md5, ours sha256
            if hash_type not in hashlib.algorithms_guaranteed:
                raise ValueError(
                    f"{manifest}: hash_type {entry.get('hash_type')!r} of {relative} is not supported "
                    f"(expected one of sha256, md5, sha1, sha512)."
                )
            actual = file_hash(weights, hash_type)
            if actual != expected:
                raise WeightsHashError(
                    f"{hash_type} of {weights} is {actual}, but {manifest} lists {expected}: the file is corrupted, "
                    "truncated or not the one the bundle was packed with. Download the bundle again (into an empty "
                    "folder), or, if you retrained it yourself, re-pack it with tools/bundles/pack_bundle.py."
                )
            verified = f"{hash_type} {actual}"
            logger.info(f"{hash_type} {actual} of {weights} matches {manifest}.")
    return verified


def resolve_weights_file(path: str | os.PathLike) -> str:
    """The weights file ``pretrained_path`` means: the path itself, or a bundle folder's ``models/model.pt``.

    Raises:
        FileNotFoundError: nothing at ``path``; a folder without ``configs/metadata.json`` (not a bundle); a bundle
            folder without ``models/model.pt`` (each message names the path it looked for).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        metadata, weights = os.path.join(path, BUNDLE_METADATA), os.path.join(path, BUNDLE_WEIGHTS)
        if not os.path.isfile(metadata):
            raise FileNotFoundError(
                f"pretrained_path {path!r} is a folder but not a bundle: {metadata} not found. Set pretrained_path to "
                "a backbone checkpoint file or to a bundle folder (configs/metadata.json and models/model.pt)."
            )
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"pretrained_path {path!r} is a bundle without weights: {weights} not found. Train that pretraining "
                "bundle first, or fetch its weights with `python -m monai.bundle download_large_files "
                f"--bundle_path {path}` if it lists them in large_files.yml."
            )
        return weights
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained weights not found: {path!r} (set pretrained_path to a backbone checkpoint, e.g. a pretrain "
            "bundle's models/model.pt, to a pretraining bundle folder, or to null to train from scratch)."
        )
    return path


def _bundle_of(weights: str) -> str | None:
    """The bundle folder holding ``weights`` as its ``models/model.pt``, if it is one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(weights)))
    if os.path.normpath(os.path.relpath(os.path.abspath(weights), root)) != os.path.normpath(BUNDLE_WEIGHTS):
        return None
    return root if os.path.isfile(os.path.join(root, BUNDLE_METADATA)) else None


def last_layer_prefixes(network: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the layer that finetuning replaces (the output layer).

    ``SwinUNETR``: ``out.``; ``BasicUNet``: ``final_conv.``; any other network: the module owning the last
    registered parameter.
    """
    from monai.networks.nets import BasicUNet, SwinUNETR

    if isinstance(network, SwinUNETR):
        return ("out.",)
    if isinstance(network, BasicUNet):
        return ("final_conv.",)
    names = [name for name, _ in network.named_parameters()]
    if not names:
        return ()
    return (names[-1].rsplit(".", 1)[0] + ".",)


def extract_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` of a checkpoint: unwraps ``{"model": ...}``/``{"state_dict": ...}`` (and
    ``network``/``net``/``backbone``) and strips leading ``module.``/``backbone.`` prefixes (repeatedly, as DDP around
    a pretraining wrapper stacks them)."""
    from hybridmim_components.weights.public_weights import unwrap_checkpoint

    return unwrap_checkpoint(checkpoint, wrapper_keys=_WRAPPER_KEYS, prefixes=_PREFIXES)[1]


SCOPES = ("all", "encoder")

#: Per backbone: the parameter prefixes of its encoder that must load under ``pretrained_scope "encoder"``, and the
#: skip blocks loaded when the file has them (SwinUNETR's ``encoder1..4``/``encoder10`` sit between the Swin encoder
#: and the decoder; Swin-only public files such as the Tang et al. encoder do not have them).
ENCODER_PREFIXES = {
    "SwinUNETR": (("swinViT.",), ("encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")),
    "BasicUNet": (("conv_0.", "down_1.", "down_2.", "down_3.", "down_4."), ()),
}
#: The weights that read the network input (their dimension 1 is the input channels), for ``adapt_in_channels``.
INPUT_LAYERS = {
    "SwinUNETR": ("swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight",
                  "encoder1.layer.conv3.conv.weight"),
    "BasicUNet": ("conv_0.conv_0.conv.weight",),
}


def _backbone_kind(network: nn.Module) -> str | None:
    from monai.networks.nets import BasicUNet, SwinUNETR

    if isinstance(network, SwinUNETR):
        return "SwinUNETR"
    if isinstance(network, BasicUNet):
        return "BasicUNet"
    return None


def network_merging(network: nn.Module) -> str | None:
    """The patch-merging order of a SwinUNETR (``"merging"``, ``"merging_legacy"``, ``"mergingv2"``), else ``None``."""
    from monai.networks.nets.swin_unetr import PatchMergingV2

    from hybridmim_components.weights.merging import LegacyPatchMerging

    if _backbone_kind(network) != "SwinUNETR":
        return None
    down = network.swinViT.layers1[0].downsample
    if isinstance(down, LegacyPatchMerging):
        return "merging_legacy"
    if isinstance(down, PatchMergingV2) and type(down).__name__ == "PatchMergingV2":
        return "mergingv2"
    return "merging"


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Fit a first-layer kernel ``O×C₀×k×k×k`` to ``in_channels`` = C input channels.

    Rule: the kernel averaged over its C₀ input channels, repeated C times and scaled by C₀/C. On an input whose C
    channels all equal ``x`` the layer then gives ``Σ_c w'_c x = C₀·mean(w)·x = Σ_c₀ w_c₀ x``: what the original
    layer gives on C₀ channels equal to ``x`` (a 1-channel CT kernel gives the CT network's activations), so the
    activations keep their scale whatever C is.
    """
    c0 = weight.shape[1]
    mean = weight.mean(dim=1, keepdim=True)
    return (mean.repeat(1, in_channels, *([1] * (weight.ndim - 2))) * (c0 / in_channels)).contiguous()


def _convert(checkpoint: Mapping, path: str):
    """``(converted checkpoint or None, flat state dict, dropped names)`` of a raw checkpoint; files of no known layout
    are read as a plain (possibly wrapped/prefixed) state dict, which the coverage check below then judges."""
    from hybridmim_components.weights import public_weights

    try:
        converted = public_weights.convert_checkpoint(checkpoint, path=path)
    except ValueError:
        return None, extract_state_dict(checkpoint), []
    return converted, converted.state_dict, list(converted.dropped)


def _format_report(report: dict, limit: int = 20) -> str:
    lines = [f"pretrained weights {report['path']}:"]
    if report.get("layout"):
        how = {"hash": " (identified by its published digest)", "shapes": " (a guess from tensor shapes only)"}
        how = how.get(report.get("identified_by"), "")
        if how and report.get("record_beside"):
            how = " (the provenance record beside the file states what it is)"
        lines.append(f"  layout: {report['layout']}{how}")
    for key in ("loaded", "missing", "unexpected", "mis_shaped", "left_to_train", "adapted"):
        names = report.get(key, [])
        if key == "adapted" and not names:
            continue
        shown = ", ".join(names[:limit]) + (f", ... (+{len(names) - limit})" if len(names) > limit else "")
        lines.append(f"  {key}: {len(names)}" + (f" [{shown}]" if names and key != "loaded" else ""))
    return "\n".join(lines)


def _check_merging(network: nn.Module, source_merging: str | None, what: str, source: str | None = None) -> None:
    """Stop before a SwinUNETR computes other features than the weights were trained with (MONAI 1.5 changed the
    order in which PatchMerging concatenates the 2×2×2 neighbours; files load without any error either way).
    ``source`` says who states ``source_merging``
    (:func:`~hybridmim_components.weights.public_weights.merging_source`)."""
    ours = network_merging(network)
    if ours is None:
        return
    if source_merging is None:
        logger.warning(f"{what}: the patch-merging order they were trained with is not recorded; assuming this "
                       f"network's ({ours}). Weights trained before MONAI 1.5 need --downsample merging_legacy.")
        return
    said = f" (as stated by {source})" if source else ""
    if source_merging != ours:
        raise PretrainedWeightsError(
            f"{what} were trained with SwinUNETR patch merging {source_merging!r}{said}, but this network uses "
            f"{ours!r}: loaded as is they would compute other features without any error. Set the bundle key "
            f"downsample to {source_merging!r} (--downsample {source_merging}).",
            {"path": what, "downsample": ours, "weights_downsample": source_merging},
        )
    logger.info(f"{what}: patch merging {source_merging!r} matches this network{said}.")


def load_pretrained_weights(
    network: nn.Module,
    path: str | os.PathLike | None,
    map_location: str | torch.device = "cpu",
    allowed_new_prefixes: Sequence[str] | None = None,
    scope: str = "all",
    adapt_in_channels: bool = False,
    expected_preprocessing: Mapping | None = None,
    strict_preprocessing: bool = False,
) -> dict | None:
    """Load pretrained weights from ``path`` into ``network``, reporting exactly what loaded; never silently partial.

    Args:
        network: the network to start (a finetuning ``SwinUNETR``/``BasicUNet``, or a pretraining network's
            ``backbone``).
        path: a checkpoint file or a bundle folder (``configs/metadata.json`` and ``models/model.pt``, e.g. a
            downloaded pretraining bundle): its ``models/model.pt``, verified first against the hash its
            ``large_files.yml``/``.yaml``/``.json`` lists. Public layouts (Tang et al.'s Swin encoder, the model zoo's
            SwinUNETR, VoCo, SuPreM, DAE, the HybridMIM authors' files; see
            :mod:`hybridmim_components.weights.public_weights`) are recognised from their keys and renamed; anything else is read as a plain state dict (``model``/
            ``state_dict`` wrappers, ``module.``/``backbone.`` prefixes stripped). ``None``, ``""`` or
            ``"null"``/``"none"`` (what a command-line override delivers): train from scratch (logged, returns ``None``).
        map_location: passed to ``torch.load`` (always ``weights_only=True``).
        allowed_new_prefixes: with ``scope="all"``, parameter prefixes allowed to stay untrained; default: the
            network's last layer.
        scope: ``"all"``: every parameter but the last layer must load (a HybridMIM pretraining covers encoder and
            decoder). ``"encoder"``: the encoder must load (SwinUNETR: ``swinViT``, plus the skip blocks
            ``encoder1..4``/``encoder10`` where the file has them; BasicUNet: ``conv_0``, ``down_1..4``); the
            decoder starts fresh even when the file has one.
        adapt_in_channels: fit the input layers of a file with C₀ input channels to this network's C by
            :func:`adapt_input_channels`; off, a channel difference stops naming this option.
        expected_preprocessing: this bundle's preprocessing (the ``preprocessing`` fields of a provenance record):
            compared with the record beside the weights, or the published one of a public layout.
        strict_preprocessing: stop (:class:`~hybridmim_components.weights.provenance.PreprocessingMismatchError`)
            instead of warning when the preprocessing differs.

    Returns:
        The report: ``path``, ``layout``, ``identified_by`` (``"hash"``, ``"keys"``, ``"shapes"``: a guess, or
        ``None`` for a plain state dict), ``record_beside`` (a provenance record lies beside the file),
        ``merging_from`` (who states the patch-merging order, or ``None``),
        ``scope``, ``sha256`` (the verified digest or ``None``), ``provenance`` (the
        record compared, or ``None``), ``preprocessing_mismatches`` and name lists ``loaded``, ``missing``,
        ``unexpected`` (incl. heads a public layout drops), ``mis_shaped``, ``left_to_train`` (allowed missing/
        mis-shaped ones) and ``adapted`` (input layers fitted to the channel count).

    Raises:
        FileNotFoundError: ``path`` does not exist; a folder that is not a bundle or has no ``models/model.pt``.
        WeightsHashError: the weights differ from the hash their bundle's ``large_files`` manifest lists.
        PretrainedWeightsError: a parameter the scope requires is missing or mis-shaped, the input channels differ
            without ``adapt_in_channels``, or the SwinUNETR patch-merging order differs from the weights'.
    """
    from hybridmim_components.weights.provenance import (
        compare_preprocessing,
        provenance_path,
        read_provenance,
        record_from_layout,
    )
    from hybridmim_components.weights.public_weights import merging_source

    if path is None or str(path).strip().lower() in ("", "null", "none"):
        logger.info("pretrained_path is empty: training from scratch (random initialisation).")
        return None
    if scope not in SCOPES:
        raise ValueError(f"pretrained_scope must be one of {SCOPES}, got {scope!r}.")
    path = resolve_weights_file(path)
    bundle = _bundle_of(path)
    # verify before torch.load: a corrupted or swapped file must not get as far as the network
    verified = verify_weights_hash(bundle) if bundle else None
    converted, source, dropped = _convert(torch.load(path, map_location=map_location, weights_only=True), path)
    layout = converted.layout if converted is not None else None
    identified_by = converted.identified_by if converted is not None else None
    not_converted = set(converted.not_converted) if converted is not None else set()
    own_record = record = read_provenance(path)
    merging, merging_from = merging_source(converted, record, provenance_path(path))
    if record is None and layout is not None and identified_by != "shapes":
        # the preprocessing its publishers state; a layout guessed from shapes states nothing about this file
        record = record_from_layout(layout)
    layout_name = getattr(layout, "title", None) or ("plain state dict" if layout is None else str(layout))
    for note in converted.notes if converted is not None else []:
        if identified_by == "shapes" and own_record is not None and "a guess" in note:
            continue  # the record beside the file states what it is
        logger.warning(f"pretrained weights {path}: {note}")
    kind = _backbone_kind(network)

    target = network.state_dict()
    if scope == "all":
        allowed = tuple(last_layer_prefixes(network) if allowed_new_prefixes is None else allowed_new_prefixes)
        required = lambda name: not name.startswith(allowed)  # noqa: E731
        in_scope = lambda name: True  # noqa: E731
    else:
        if kind is None:
            raise ValueError(f"pretrained_scope 'encoder' needs a SwinUNETR or BasicUNet, got {type(network).__name__}.")
        must, optional = ENCODER_PREFIXES[kind]
        # a part the file holds in an unconvertible form (the DAE stem) starts fresh: the encoder scope's promise is
        # the pretrained encoder stages, and the log below names what is not loaded
        required = lambda name: name.startswith(must) and name not in not_converted  # noqa: E731
        in_scope = lambda name: name.startswith(must + optional)  # noqa: E731

    # input channels: the only mismatch with a documented fix
    adapted = []
    for name in INPUT_LAYERS.get(kind, ()):
        s, t = source.get(name), target.get(name)
        if s is None or t is None or s.shape == t.shape or s.shape[:1] + s.shape[2:] != t.shape[:1] + t.shape[2:]:
            continue
        if not adapt_in_channels:
            raise PretrainedWeightsError(
                f"pretrained weights {path} ({layout_name}) take {s.shape[1]} input channels, this network "
                f"{t.shape[1]} ({name} {tuple(s.shape)} vs {tuple(t.shape)}). Set adapt_in_channels true "
                f"(--adapt_in_channels true) to fit the input layers (mean kernel repeated and scaled), or use "
                f"weights pretrained on {t.shape[1]}-channel input.",
                {"path": path, "layout": layout_name, "mis_shaped": [name]},
            )
        source = dict(source, **{name: adapt_input_channels(s, t.shape[1])})
        adapted.append(f"{name} {tuple(s.shape)}->{tuple(t.shape)}")

    loadable, shape_mismatch, out_of_scope = {}, {}, []  # shape_mismatch: name -> "name (file)->(network)"
    for name, value in source.items():
        if name not in target:
            continue
        if not in_scope(name):
            out_of_scope.append(name)
        elif target[name].shape == value.shape:
            loadable[name] = value
        else:
            shape_mismatch[name] = f"{name} {tuple(value.shape)}->{tuple(target[name].shape)}"
    mis_shaped = list(shape_mismatch.values())
    missing = [name for name in target if name not in loadable and name not in shape_mismatch]
    unexpected = [name for name in source if name not in target] + list(dropped)
    report = {
        "path": path,
        "layout": layout_name,
        "identified_by": identified_by,
        "record_beside": own_record is not None,
        "merging_from": merging_from,
        "scope": scope,
        "sha256": verified.split()[1] if verified and verified.startswith("sha256 ") else None,
        "loaded": sorted(loadable),
        "missing": missing,
        "unexpected": unexpected,
        "mis_shaped": mis_shaped,
        "left_to_train": [n for n in missing if not required(n)]
        + [text for n, text in shape_mismatch.items() if not required(n)],
        "adapted": adapted,
        "provenance": record,
    }
    text = _format_report(report)
    failing = [n for n in missing if required(n)] + [text for n, text in shape_mismatch.items() if required(n)]
    if failing:
        hint = ""
        if scope == "all" and kind is not None:
            must, _ = ENCODER_PREFIXES[kind]
            if not any(f.startswith(must) for f in failing):
                hint = (" The file covers the encoder only: set pretrained_scope \"encoder\" (--pretrained_scope "
                        "encoder) to load it and train the decoder from scratch.")
            elif not_converted and {f.split(" ")[0] for f in failing} <= not_converted:
                hint = (" The file's patch embedding is a convolution stem that MONAI's PatchEmbed cannot compute "
                        "(no exact mapping exists): set pretrained_scope \"encoder\" (--pretrained_scope encoder) to "
                        "load the Swin stages and skip blocks and train swinViT.patch_embed and the decoder from "
                        "scratch.")
        raise PretrainedWeightsError(
            f"{text}\n{len(failing)} parameters that pretrained_scope {scope!r} requires did not load: these weights "
            f"do not fit this network (wrong backbone, feature size or input channels?).{hint} Refusing to train "
            "from partially random weights.",
            report,
        )
    # encoder tensors this network has no place for (e.g. SwinUNETR-v2's layers1c..4c): it would compute otherwise
    foreign = [n for n in unexpected if n.startswith("swinViT.") and n in source]
    if foreign:
        v2 = any(n.startswith(("swinViT.layers1c.", "swinViT.layers2c.", "swinViT.layers3c.", "swinViT.layers4c."))
                 for n in foreign)
        raise PretrainedWeightsError(
            f"{text}\n{len(foreign)} Swin encoder tensors of the file have no place in this network ("
            f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): the encoder would compute something else."
            + (" These are SwinUNETR-v2 weights: set use_v2 true (--use_v2 true)." if v2 else ""),
            report,
        )
    if kind == "SwinUNETR" and any(n.startswith("swinViT.layers") and ".downsample." in n for n in loadable):
        _check_merging(network, merging, f"pretrained weights {path} ({layout_name})", merging_from)
    report["preprocessing_mismatches"] = compare_preprocessing(
        record, expected_preprocessing, strict=bool(strict_preprocessing), what=f"pretrained weights {path}"
    )
    network.load_state_dict(loadable, strict=False)
    logger.info(text)
    fresh_stem = sorted(n for n in not_converted if n in target and n not in loadable)
    if fresh_stem:
        logger.warning(
            f"pretrained weights {path}: {', '.join(fresh_stem)} NOT loaded: the file's convolution stem has no exact "
            "counterpart in MONAI's PatchEmbed, which starts from random weights; the Swin stages after it are the "
            "file's, trained on the stem's output. This is the DAE encoder less its stem, not the DAE encoder."
        )
    if scope == "encoder":
        fresh = sorted({n.split(".")[0] for n in target if not in_scope(n)})
        logger.info(f"pretrained_scope 'encoder': {len(loadable)} encoder tensors loaded; the decoder "
                    f"({', '.join(fresh)}) starts from random weights" +
                    (f" ({len(out_of_scope)} decoder tensors in the file were not loaded)." if out_of_scope else "."))
    return report
