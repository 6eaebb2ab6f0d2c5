"""Convert a public pretrained checkpoint once into a pretraining bundle's ``models/model.pt`` and its provenance.

    python tools/weights/import_weights.py model_swinvit.pt --out my_bundles/hybridmim_swin_pretrain --scope encoder

The file's layout is recognised from its keys (Tang et al.'s Swin encoder, the model zoo's SwinUNETR, VoCo, SuPreM,
DAE, the HybridMIM authors' files, or MONAI's own names: :mod:`hybridmim_components.weights.public_weights`). The
tensors are loaded into the bundle's own backbone (built from its ``configs/train.json`` with the file's width,
merging order and SwinUNETR version, so the check is the one a finetune makes), the load report is printed, and then
written:

- ``<out>/models/model.pt``: the tensors that loaded, in the bundle's names. Nothing else: with ``--scope encoder``
  the decoder is *absent*, not random, so a finetune loading it with ``pretrained_scope "all"`` stops instead of
  taking a random decoder for a pretrained one.
- ``<out>/models/model.provenance.json``: the published preprocessing of that layout (or the record beside the source
  file, which wins), the merging order and where it came from (``downsample_from``), the architecture read from the
  tensors, the source file's SHA-256 and the versions of this run.

The SwinUNETR patch-merging order is never invented. It comes from, in this order: a provenance record beside the
source file; the digest of a published file (``KNOWN_FILE_HASHES``); a published layout recognised from its keys (the
order its publishers trained with); or ``--downsample`` (the user's word). A file in MONAI's own names without a record,
or one recognised from its shapes only (a guess), has no known order: the tool stops and asks for ``--downsample``
(or a record beside the file). ``--downsample`` contradicting a record or a known digest stops too.

The result can be packed and shared with ``tools/bundles/pack_bundle.py`` like a bundle trained here. ``--out`` is a
copy of a pretraining bundle (``cp -r bundles/hybridmim_swin_pretrain my_bundles/``); an existing ``model.pt`` is only
replaced with ``--force``. The finetune keys to use with the result are printed at the end.

Exit status: 0 on success, 1 when the weights do not fit (the report says why), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from hybridmim_components.utils.atomic_files import atomic_open

__all__ = ["import_weights", "main"]

logger = logging.getLogger("import_weights")


def _backbone_from_bundle(bundle: str, overrides: dict):
    """The bundle's own backbone (``network_def.backbone`` of ``configs/train.json``) with ``overrides``."""
    from monai.bundle import ConfigParser

    train = os.path.join(bundle, "configs", "train.json")
    if not os.path.isfile(train):
        raise FileNotFoundError(f"--out {bundle!r} is not a bundle: {train} not found (copy a pretraining bundle, "
                                "e.g. cp -r bundles/hybridmim_swin_pretrain <out>).")
    parser = ConfigParser()
    parser.read_config(train)
    parser["bundle_root"] = bundle
    for key, value in overrides.items():
        if key not in parser.config:
            raise ValueError(f"{train} has no key {key!r}: is {bundle} a SwinUNETR pretraining bundle?")
        parser[key] = value
    network = parser.get_parsed_content("network_def", instantiate=True)
    return parser, getattr(network, "backbone", network)


MERGING_ORDERS = ("merging", "merging_legacy", "mergingv2")


def merging_order(src: str, converted, record: dict | None, downsample: str | None) -> tuple[str, str]:
    """``(patch-merging order, where it came from)`` for a SwinUNETR file; see the module docstring.

    Raises:
        ValueError: nothing states the order and ``downsample`` is ``None``, or ``downsample`` contradicts a record
            beside the file or a published file's digest (names both).
    """
    from hybridmim_components.weights.provenance import provenance_path
    from hybridmim_components.weights.public_weights import merging_source

    if downsample is not None and downsample not in MERGING_ORDERS:
        raise ValueError(f"--downsample {downsample!r}: expected one of {', '.join(MERGING_ORDERS)}.")
    stated, source = merging_source(converted, record, provenance_path(src))
    if downsample is None:
        if stated is None:
            how = ("recognised from its tensor shapes only (a guess: " + converted.layout.name + ")"
                   if converted.identified_by == "shapes" else "a state dict in MONAI's own names")
            raise ValueError(
                f"{src}: the SwinUNETR patch-merging order these weights were trained with is not known (the file is "
                f"{how}, without a provenance record at {provenance_path(src)} and with no published digest). "
                "State it: --downsample merging (trained with MONAI >= 1.5, e.g. by these bundles) or --downsample "
                "merging_legacy (MONAI < 1.5 or a copy of its SwinUNETR), or put a provenance record beside the file."
            )
        return stated, source
    if stated is not None and stated != downsample:
        if converted.identified_by == "hash" or source.startswith("the provenance record"):
            raise ValueError(
                f"{source} says these weights were trained with patch merging {stated!r}, but --downsample "
                f"{downsample} was given: leave --downsample out, or correct the record if it is wrong."
            )
        logger.warning(f"--downsample {downsample} overrides {stated!r} of {source}.")
    elif stated == downsample:
        return stated, source
    return downsample, "the --downsample flag (the user's statement)"


def import_weights(src: str, out: str, scope: str = "all", adapt_in_channels: bool = False,
                   force: bool = False, downsample: str | None = None) -> dict:
    """Convert ``src`` into ``out/models/model.pt`` + ``model.provenance.json``; returns the load report (with
    ``overrides`` and ``merging_from``).

    Args:
        downsample: the SwinUNETR patch-merging order the weights were trained with, when nothing else states it
            (:func:`merging_order`).

    Raises:
        FileExistsError: ``out/models/model.pt`` exists and ``force`` is false.
        ValueError: the merging order is unknown and ``downsample`` not given, or contradicted.
        hybridmim_components.PretrainedWeightsError: the weights do not fit the bundle's backbone in ``scope``.
    """
    import torch

    from hybridmim_components.weights.provenance import (make_record, read_provenance, record_from_layout,
                                                         runtime_versions, write_provenance)
    from hybridmim_components.weights.public_weights import convert_checkpoint
    from hybridmim_components.weights.transfer import file_hash, load_pretrained_weights

    weights = os.path.join(out, "models", "model.pt")
    if os.path.exists(weights) and not force:
        raise FileExistsError(f"{weights} exists: pass --force to replace it (its provenance record too).")
    converted = convert_checkpoint(torch.load(src, map_location="cpu", weights_only=True), path=src)
    src_record = read_provenance(src)
    arch = dict(converted.architecture)
    overrides, merging_from = {}, None
    if arch.get("backbone") == "SwinUNETR":
        order, merging_from = merging_order(src, converted, src_record, downsample)
        overrides = {"feature_size": arch["feature_size"], "use_v2": bool(arch.get("use_v2")), "downsample": order}
        logger.info(f"patch merging {order!r}, from {merging_from}.")
    elif arch.get("backbone") == "BasicUNet":
        overrides = {"features": list(arch["features"])}
    parser, backbone = _backbone_from_bundle(out, overrides)
    report = load_pretrained_weights(backbone, src, scope=scope, adapt_in_channels=adapt_in_channels)
    state = {name: tensor for name, tensor in backbone.state_dict().items() if name in set(report["loaded"])}

    if src_record is not None:
        record = dict(src_record)  # what the file's own record states wins over a layout's published defaults
    elif converted.identified_by != "shapes" and record_from_layout(converted.layout):
        record = record_from_layout(converted.layout)
    else:
        record = make_record(arch.get("backbone") or type(backbone).__name__, None, backbone_in_channels(backbone), {})
    record.update({
        "width": overrides.get("feature_size", overrides.get("features")),
        "in_channels": backbone_in_channels(backbone),
        "downsample": overrides.get("downsample"),
        "downsample_from": merging_from,
        "use_v2": overrides.get("use_v2"),
        "layout": converted.layout.name,
        "layout_identified_by": converted.identified_by,
        "covers": "encoder" if scope == "encoder" else converted.covers,
        "imported_from": os.path.abspath(src),
        "imported_sha256": file_hash(src),
        "imported_tensors": len(state),
        "adapted": report["adapted"],
    })
    record.update(runtime_versions())
    with atomic_open(weights, "wb", fsync=True) as f:
        torch.save(state, f)
    write_provenance(weights, record)
    report["written"] = weights
    report["overrides"] = overrides
    report["merging_from"] = merging_from
    return report


def backbone_in_channels(backbone) -> int:
    first = next(p for name, p in backbone.named_parameters() if p.ndim >= 4)
    return int(first.shape[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="the public checkpoint file (.pt/.pth)")
    parser.add_argument("--out", required=True, help="a copy of a pretraining bundle to write models/ into")
    parser.add_argument("--scope", default="all", choices=("all", "encoder"),
                        help="what must load: all (encoder and decoder) or encoder (decoder left out)")
    parser.add_argument("--adapt_in_channels", action="store_true",
                        help="fit the input layers to the bundle's in_channels (mean kernel repeated, scaled)")
    parser.add_argument("--force", action="store_true", help="replace an existing models/model.pt")
    parser.add_argument("--downsample", choices=MERGING_ORDERS,
                        help="the SwinUNETR patch-merging order the weights were trained with, for a file nothing "
                        "else states it for (no record beside it, no published digest, no layout known by its keys)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from hybridmim_components import PretrainedWeightsError

    if not os.path.isfile(args.src):
        print(f"error: {args.src} not found", file=sys.stderr)
        return 2
    try:
        report = import_weights(args.src, args.out, args.scope, args.adapt_in_channels, args.force, args.downsample)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, PretrainedWeightsError) else 2
    keys = [f"--{k} {json.dumps(v).replace(' ', '')}" for k, v in report["overrides"].items()]
    if args.scope == "encoder":
        keys.append("--pretrained_scope encoder")
    if report["adapted"]:
        keys.append("--adapt_in_channels true")
    print(f"{report['layout']}: {len(report['loaded'])} tensors written to {report['written']} "
          f"(+ {os.path.basename(report['written'])[:-3]}.provenance.json), {len(report['unexpected'])} left out.")
    if report["merging_from"]:
        print(f"patch merging {report['overrides']['downsample']!r}, from {report['merging_from']}.")
    print("finetune with: --pretrained_path " + os.path.abspath(args.out) + (" " + " ".join(keys) if keys else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
