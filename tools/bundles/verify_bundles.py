"""Run, for every bundle, the checks of the MONAI model zoo's CI (``ci/verify_bundle.py -m full``), and print a table.

What the zoo's ``verify(bundle, mode="full")`` runs (Project-MONAI/model-zoo, ``ci/verify_bundle.py``), and how it is
mirrored here, one column each:

- ``files``: ``verify_bundle_directory``: ``configs/metadata.json`` and ``LICENSE`` must exist, and the preferred
  ``configs/inference.json``. The zoo also prefers ``models/model.pt`` (downloaded through ``large_files.yml``); these
  bundles ship no weights, so its absence is only noted.
- ``version``: ``verify_version_changes``: ``version`` and ``changelog`` present, the version listed in the changelog
  (the zoo's "version not already released" look-up in its own ``model_info.json`` has no counterpart here).
- ``metadata``: ``verify_metadata_format``: ``monai.bundle.verify_metadata`` against the schema file, offline.
- ``properties``: the zoo checks the inference workflow's properties only for bundles listing ``supported_apps``
  (ours list none). Here ``ConfigWorkflow(workflow_type=...)`` is initialized (its ``initialize`` expressions run,
  inference loads ``models/model.pt``) and ``check_properties()`` must return ``[]``, for ``train`` and ``inference``,
  on a tiny synthetic datalist.
- ``net_in_out``: ``verify_data_shape``: ``verify_net_in_out("network_def", metadata, configs/inference.json)``,
  input built from ``network_data_format`` (``n=1``); no bundle is exempted (the zoo's ``exclude_verify_shape_list``).
- ``torchscript``: ``verify_torchscript``: ``ckpt_export("network_def", ckpt_file=models/model.pt,
  configs/inference.json)`` (``torch.jit.script``), then a forward pass of the exported module, compared with the
  eager network. ``models/model.pt`` is written as ``train.json``'s best-model ``CheckpointSaver`` writes it (same
  object, same layout), so the check also proves that what training saves is what inference and export load.
  SwinUNETR cannot be scripted: the Swin bundles are skipped, as the zoo skips its own ``swin_unetr_btcv_segmentation``
  (``exclude_verify_torchscript_list`` in ``ci/bundle_custom_data.py``).

By default the networks are shrunk (``--feature_size 12`` / ``--features [4,4,8,8,16,4]``) so that everything runs on
CPU in about a minute; ``--full_width`` keeps the bundles' defaults (GPU-sized).

    python tools/bundles/verify_bundles.py                                   # all bundles under bundles/
    python tools/bundles/verify_bundles.py --bundles hybridmim_unet_btcv --schema /path/to/another_schema.json

The schema is vendored in ``tools/bundles/schema/`` (its origin and licence are noted there); ``--schema`` only
points the check at another copy.

Exit status: 0 when no check failed, 1 when any failed, 2 on bad arguments (e.g. no schema file).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
# the schema configs/metadata.json names, vendored (Apache-2.0, MONAI-extra-test-data 0.8.1; see schema/README.md)
DEFAULT_SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema", "meta_schema_20240725.json")
SCHEMA_SHA256 = "d95c74c2915faef04ff6a2d6bd865da922bc8cd5afb4a0719b2dc6e1220528e7"  # of the published file

CHECKS = ("files", "version", "metadata", "properties_train", "properties_inference", "net_in_out", "torchscript")
NET_ID = "network_def"  # the zoo's _get_net_id for every bundle but two generative ones

# Mirror of the zoo's exclusion lists (ci/bundle_custom_data.py). No bundle is exempted from the data-shape check.
EXCLUDE_VERIFY_SHAPE: dict[str, str] = {}
_SWIN_NO_SCRIPT = ("SwinUNETR cannot be scripted (torch.jit.script); the zoo exempts its swin_unetr_btcv_segmentation "
                   "(exclude_verify_torchscript_list, ci/bundle_custom_data.py)")
EXCLUDE_VERIFY_TORCHSCRIPT: dict[str, str] = {
    name: _SWIN_NO_SCRIPT
    for name in (
        "hybridmim_swin_pretrain",
        "hybridmim_swin_pretrain_brats",
        "hybridmim_swin_btcv",
        "hybridmim_swin_msd_spleen",
        "hybridmim_swin_msd_liver",
        "hybridmim_swin_brats",
    )
}

TINY_FEATURE_SIZE = 12
TINY_FEATURES = [4, 4, 8, 8, 16, 4]


@dataclass
class Result:
    bundle: str
    check: str
    status: str  # "pass" | "fail" | "skipped"
    detail: str = ""


class CheckFailed(Exception):
    """A check's own finding (as opposed to an unexpected exception, reported with its type)."""


# --- helpers --------------------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def width_overrides(config: dict, full_width: bool) -> dict:
    """The override that shrinks the backbone: ``feature_size`` (SwinUNETR bundles) or ``features`` (UNet)."""
    if full_width:
        return {}
    if "feature_size" in config:
        return {"feature_size": TINY_FEATURE_SIZE}
    if "features" in config:
        return {"features": list(TINY_FEATURES)}
    return {}


def _fake_input(meta: dict):
    """``1×C×spatial`` random input as ``verify_net_in_out`` builds it from ``network_data_format`` (n=1)."""
    import torch
    from monai.bundle.scripts import _get_fake_spatial_shape

    image = meta["network_data_format"]["inputs"]["image"]
    shape = _get_fake_spatial_shape(image["spatial_shape"], p=1, n=1, any=1)
    return torch.rand(1, int(image["num_channels"]), *shape)


def _make_datalist(workdir: str, in_channels: int, cache: dict) -> str:
    """A tiny synthetic datalist (real NIfTI files, 32³) for the properties checks: CT (1 channel, with labels) or
    BraTS-like MRI (4 channels). Files only have to exist: nothing is cached or loaded (``cache_rate 0``)."""
    if in_channels not in cache:
        if REPO_ROOT not in sys.path:
            sys.path.insert(0, REPO_ROOT)
        from tools.data.make_demo_data import make_brats_dataset, make_ct_dataset

        out = os.path.join(workdir, f"data_{in_channels}ch")
        if in_channels == 4:
            cache[in_channels] = make_brats_dataset(out, shape=(32, 32, 32), n_train=1, n_val=1, n_test=1)
        else:
            cache[in_channels] = make_ct_dataset(out, num_classes=2, shape=(32, 32, 32), n_train=1, n_val=1, n_test=1)
    return cache[in_channels]


def _saved_model_checkpoint(bundle_path: str, width: dict, path: str) -> str:
    """Write ``models/model.pt`` as ``train.json``'s best-model saver would: the state dict of the object in the
    ``save_dict`` of the ``CheckpointSaver`` (under ``validate#handlers``) whose ``key_metric_filename`` is model.pt.
    A single-object ``CheckpointSaver`` (ignite ``Checkpoint``) saves that object's state dict, flat."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_path, "configs", "train.json"))
    parser.update({"bundle_root": bundle_path, "device": "$torch.device('cpu')", **width})
    handlers = parser.get("validate#handlers", [])
    index = [
        i for i, h in enumerate(handlers)
        if isinstance(h, dict) and str(h.get("_target_", "")).endswith("CheckpointSaver")
        and h.get("key_metric_filename") == "model.pt"
    ]
    if len(index) != 1:
        raise CheckFailed(
            f"{bundle_path}/configs/train.json: expected one CheckpointSaver in validate#handlers with "
            f"key_metric_filename 'model.pt', found {len(index)}."
        )
    save_dict = handlers[index[0]].get("save_dict", {})
    if len(save_dict) != 1:
        raise CheckFailed(f"{bundle_path}/configs/train.json: the model.pt saver's save_dict must hold one object, "
                          f"got keys {sorted(save_dict)}.")
    key = next(iter(save_dict))
    module = parser.get_parsed_content(f"validate#handlers#{index[0]}#save_dict#{key}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(module.state_dict(), path)
    return path


# --- the checks -----------------------------------------------------------------------------------------------------
def check_files(bundle_path: str) -> str:
    missing = [f for f in ("configs/metadata.json", "LICENSE", "configs/inference.json")
               if not os.path.isfile(os.path.join(bundle_path, f))]
    if missing:
        raise CheckFailed(f"missing {missing}")
    if not os.path.isfile(os.path.join(bundle_path, "models", "model.pt")):
        return "no models/model.pt (weights are not shipped)"
    return ""


def check_version(meta: dict) -> str:
    for key in ("version", "changelog"):
        if key not in meta:
            raise CheckFailed(f"'{key}' is missing in configs/metadata.json")
    if meta["version"] not in meta["changelog"]:
        raise CheckFailed(f"version {meta['version']} is not in the changelog {sorted(meta['changelog'])}")
    return ""


def check_metadata(bundle_path: str, schema: str) -> str:
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=os.path.join(bundle_path, "configs", "metadata.json"), filepath=schema)
    return ""


def check_properties(bundle_path: str, workflow_type: str, overrides: dict) -> str:
    from monai.bundle import ConfigWorkflow

    config = "train.json" if workflow_type == "train" else "inference.json"
    workflow = ConfigWorkflow(
        config_file=os.path.join(bundle_path, "configs", config),
        meta_file=os.path.join(bundle_path, "configs", "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        **overrides,
    )
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise CheckFailed(f"check_properties() of configs/{config} returned {missing}")
    return ""


def check_net_in_out(bundle_path: str, width: dict, device: str) -> str:
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id=NET_ID,
        meta_file=os.path.join(bundle_path, "configs", "metadata.json"),
        config_file=os.path.join(bundle_path, "configs", "inference.json"),
        bundle_root=bundle_path,
        device=device,
        n=1,
        **width,
    )
    return ""


def check_torchscript(bundle_path: str, meta: dict, width: dict, ckpt: str, out_dir: str) -> str:
    import torch
    from monai.bundle import ConfigParser, ckpt_export

    ts_path = os.path.join(out_dir, "verify_model.ts")
    config_file = os.path.join(bundle_path, "configs", "inference.json")
    meta_file = os.path.join(bundle_path, "configs", "metadata.json")
    ckpt_export(net_id=NET_ID, filepath=ts_path, ckpt_file=ckpt, meta_file=meta_file, config_file=config_file,
                bundle_root=bundle_path, **width)
    exported = torch.jit.load(ts_path, map_location="cpu").eval()
    # the eager network with the same weights gives the reference output
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.read_meta(meta_file)
    parser.update({"bundle_root": bundle_path, **width})
    net = parser.get_parsed_content(NET_ID)
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True), strict=True)
    net.eval()
    x = _fake_input(meta)
    with torch.no_grad():
        y, ref = exported(x), net(x)
    channels = int(meta["network_data_format"]["outputs"]["pred"]["num_channels"])
    if not isinstance(y, torch.Tensor) or y.shape[1] != channels:
        raise CheckFailed(f"exported module's output {getattr(y, 'shape', type(y))} does not have {channels} channels")
    if y.shape != ref.shape or not torch.allclose(y, ref, atol=1e-5, rtol=1e-4):
        raise CheckFailed("exported module's output differs from the eager network's "
                          f"(max |diff| {float((y - ref).abs().max()) if y.shape == ref.shape else 'shape'})")
    return ""


# --- running --------------------------------------------------------------------------------------------------------
def _describe(error: BaseException, limit: int = 400) -> str:
    """``Type: message`` of an error and of its root cause (MONAI wraps config errors: the cause is the finding)."""
    parts = []
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(" ".join(f"{type(error).__name__}: {error}".split()))
        error = error.__cause__ or error.__context__
    text = parts[0] if len(parts) == 1 else f"{parts[0][:limit // 2]} <- caused by {parts[-1]}"
    return text[:limit]


def _run(results: list, bundle: str, check: str, fn, *args) -> bool:
    try:
        detail = fn(*args)
    except CheckFailed as e:
        results.append(Result(bundle, check, "fail", str(e)))
        return False
    except Exception as e:  # noqa: BLE001 - every error is a finding of the check that raised it
        logging.getLogger(__name__).debug("%s %s", bundle, check, exc_info=True)
        results.append(Result(bundle, check, "fail", _describe(e)))
        return False
    results.append(Result(bundle, check, "pass", detail or ""))
    return True


def verify_bundle(bundle: str, bundles_dir: str, schema: str, workdir: str, checks=CHECKS, full_width: bool = False,
                  device: str = "cpu", data_cache: dict | None = None) -> list[Result]:
    """Run ``checks`` on one bundle; a failing check does not stop the others."""
    results: list[Result] = []
    bundle_path = os.path.abspath(os.path.join(bundles_dir, bundle))
    data_cache = {} if data_cache is None else data_cache
    if not os.path.isdir(bundle_path):
        return [Result(bundle, c, "fail", f"no bundle folder {bundle_path}") for c in checks]
    try:
        meta = _read_json(os.path.join(bundle_path, "configs", "metadata.json"))
        inference = _read_json(os.path.join(bundle_path, "configs", "inference.json"))
    except (OSError, ValueError) as e:
        return [Result(bundle, c, "fail", f"cannot read configs: {e}") for c in checks]
    width = width_overrides(inference, full_width)
    scratch = os.path.join(workdir, bundle)
    ckpt_dir = os.path.join(scratch, "models")
    ckpt = os.path.join(ckpt_dir, "model.pt")

    weights_error: list[str] = []

    def weights() -> str:
        """models/model.pt as training writes it; built once, needed by properties_inference and torchscript."""
        if weights_error:
            raise CheckFailed(weights_error[0])
        if not os.path.isfile(ckpt):
            try:
                _saved_model_checkpoint(bundle_path, width, ckpt)
            except Exception as e:  # noqa: BLE001
                weights_error.append(f"cannot write models/model.pt as train.json saves it: {type(e).__name__}: {e}")
                raise CheckFailed(weights_error[0]) from e
        return ckpt

    def overrides(workflow_type: str) -> dict:
        in_channels = int(meta["network_data_format"]["inputs"]["image"]["num_channels"])
        datalist = _make_datalist(workdir, in_channels, data_cache)
        o = {"bundle_root": bundle_path, "dataset_dir": os.path.dirname(datalist),
             "data_list_file_path": os.path.basename(datalist), "ckpt_dir": ckpt_dir,
             "output_dir": os.path.join(scratch, "eval"), "device": f"$torch.device('{device}')", **width}
        if workflow_type == "train":
            o.update({"cache_rate": 0, "train#dataloader#num_workers": 0})
            if "pretrained_path" in _read_json(os.path.join(bundle_path, "configs", "train.json")):
                o["pretrained_path"] = ""  # from scratch: the transfer itself is tested elsewhere
        return o

    for check in checks:
        if check == "files":
            _run(results, bundle, check, check_files, bundle_path)
        elif check == "version":
            _run(results, bundle, check, check_version, meta)
        elif check == "metadata":
            _run(results, bundle, check, check_metadata, bundle_path, schema)
        elif check in ("properties_train", "properties_inference"):
            workflow_type = check.split("_", 1)[1]

            def properties(wt=workflow_type):
                if wt == "inference":
                    weights()
                return check_properties(bundle_path, wt, overrides(wt))

            _run(results, bundle, check, properties)
        elif check == "net_in_out":
            if bundle in EXCLUDE_VERIFY_SHAPE:
                results.append(Result(bundle, check, "skipped", EXCLUDE_VERIFY_SHAPE[bundle]))
            else:
                _run(results, bundle, check, check_net_in_out, bundle_path, width, device)
        elif check == "torchscript":
            if bundle in EXCLUDE_VERIFY_TORCHSCRIPT:
                results.append(Result(bundle, check, "skipped", EXCLUDE_VERIFY_TORCHSCRIPT[bundle]))
            else:
                _run(results, bundle, check, lambda: check_torchscript(bundle_path, meta, width, weights(), scratch))
        else:
            raise ValueError(f"unknown check {check!r}; expected one of {CHECKS}")
    return results


def list_bundles(bundles_dir: str) -> list[str]:
    return sorted(d for d in os.listdir(bundles_dir)
                  if os.path.isfile(os.path.join(bundles_dir, d, "configs", "metadata.json")))


def verify_bundles(bundles=None, bundles_dir: str = BUNDLES_DIR, schema: str = DEFAULT_SCHEMA, checks=CHECKS,
                   full_width: bool = False, device: str = "cpu", workdir: str | None = None) -> list[Result]:
    """Run ``checks`` on ``bundles`` (default: every bundle under ``bundles_dir``), all in this process."""
    if "metadata" in checks and not os.path.isfile(schema):
        raise FileNotFoundError(
            f"metadata schema not found at '{schema}'. Pass --schema PATH to a local copy of the schema that "
            "configs/metadata.json names (meta_schema_20240725.json from Project-MONAI/MONAI-extra-test-data "
            "release 0.8.1); the check runs offline."
        )
    bundles = list(bundles) if bundles else list_bundles(bundles_dir)
    own_workdir = workdir is None
    workdir = tempfile.mkdtemp(prefix="verify_bundles_") if own_workdir else workdir
    try:
        # verify_metadata gets a copy: it may write next to the schema file
        schema_copy = os.path.join(workdir, "schema.json")
        if "metadata" in checks:
            shutil.copy(schema, schema_copy)
        data_cache: dict = {}
        results: list[Result] = []
        for bundle in bundles:
            results += verify_bundle(bundle, bundles_dir, schema_copy, workdir, checks, full_width, device, data_cache)
        return results
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def format_table(results: list[Result]) -> str:
    """One row per bundle, one column per check (pass / FAIL / skipped), then the reasons and errors, numbered."""
    bundles = list(dict.fromkeys(r.bundle for r in results))
    checks = list(dict.fromkeys(r.check for r in results))
    cell: dict = {}
    notes: list[str] = []
    numbers: dict = {}  # one note per distinct (status, detail), listing the bundles it applies to
    for r in results:
        text = {"pass": "pass", "fail": "FAIL", "skipped": "skipped"}[r.status]
        if r.detail:
            key = (r.status, r.check, r.detail)
            if key not in numbers:
                numbers[key] = len(numbers) + 1
                notes.append([r.status, r.check, r.detail, []])
            notes[numbers[key] - 1][3].append(r.bundle)
            text += f" [{numbers[key]}]"
        cell[(r.bundle, r.check)] = text
    widths = [max([len("bundle")] + [len(b) for b in bundles])]
    widths += [max([len(c)] + [len(cell.get((b, c), "")) for b in bundles]) for c in checks]
    lines = ["  ".join(h.ljust(w) for h, w in zip(["bundle", *checks], widths))]
    lines.append("  ".join("-" * w for w in widths))
    for b in bundles:
        lines.append("  ".join(v.ljust(w) for v, w in zip([b, *(cell.get((b, c), "") for c in checks)], widths)))
    failed = sum(r.status == "fail" for r in results)
    lines.append("")
    lines.append(f"{len(bundles)} bundle(s), {len(results)} check(s): {failed} failed, "
                 f"{sum(r.status == 'skipped' for r in results)} skipped.")
    if notes:
        lines.append("")
    for i, (status, check, detail, names) in enumerate(notes, 1):
        where = "all bundles" if len(names) == len(bundles) > 1 else ", ".join(names)
        lines.append(f"[{i}] {check} {status}: {detail}  ({where})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs="+", default=None, metavar="NAME",
                        help="bundle folder names (default: all bundles under --bundles_dir)")
    parser.add_argument("--bundles_dir", default=BUNDLES_DIR, help="folder holding the bundles (default: bundles/)")
    parser.add_argument("--schema", default=DEFAULT_SCHEMA,
                        help="local metadata schema file for verify_metadata (default: %(default)s)")
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS, metavar="CHECK",
                        help=f"checks to run (default: all of {', '.join(CHECKS)})")
    parser.add_argument("--full_width", action="store_true",
                        help="keep the bundles' network widths (default: tiny widths, CPU in seconds)")
    parser.add_argument("--device", default="cpu", help="device for the network checks (default: cpu)")
    parser.add_argument("--verbose", action="store_true", help="show MONAI's log messages and error tracebacks")
    args = parser.parse_args(argv)

    if "metadata" in args.checks and not os.path.isfile(args.schema):
        parser.error(f"metadata schema not found at '{args.schema}': pass --schema PATH to a local copy of "
                     "meta_schema_20240725.json (the schema configs/metadata.json names).")
    if not os.path.isdir(args.bundles_dir):
        parser.error(f"bundles folder not found: '{args.bundles_dir}'")
    if args.bundles:
        unknown = [b for b in args.bundles if not os.path.isdir(os.path.join(args.bundles_dir, b))]
        if unknown:
            parser.error(f"no such bundle(s) under {args.bundles_dir}: {unknown}; "
                         f"available: {list_bundles(args.bundles_dir)}")
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG)
    previous_disable = logging.root.manager.disable
    with warnings.catch_warnings():
        if not args.verbose:  # MONAI's loggers log every call's arguments at INFO; the table says what matters
            logging.disable(logging.WARNING)
            warnings.simplefilter("ignore")
        try:
            results = verify_bundles(args.bundles, args.bundles_dir, args.schema, args.checks, args.full_width,
                                     args.device)
        finally:  # main() may be called in-process (tests): leave logging as it was
            logging.disable(previous_disable)
    print(format_table(results))
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001 - an unexpected crash still exits non-zero, with its traceback
        traceback.print_exc()
        sys.exit(1)
