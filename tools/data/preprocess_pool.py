"""Preprocess a pretraining pool once into a pool store, for ``configs/pool_store.json`` of a pretraining bundle.

Applies the deterministic part of the bundle's own training transforms (``train#deterministic_transforms`` of its
``configs/train.json``, parsed with ``monai.bundle.ConfigParser``, with the same overrides as training: the store
cannot drift from the bundle) to every volume of the datalist's ``training`` and ``validation`` lists, and writes the
store that ``hybridmim_components.workflow.pool_store`` reads (one float32 ``.npy`` per volume, a record beside it,
and ``manifest.json`` with source path, SHA-256, shape, spacing and affine of every volume). Training from the store
then needs neither the NIfTI files nor the datalist (another machine can train with the store alone)::

    python tools/data/preprocess_pool.py bundles/hybridmim_swin_pretrain /data/pool_store --dataset_dir /data

- resumable: a volume whose record matches its source (size and mtime, or else its SHA-256) and the transforms is
  skipped, so a rerun after a kill redoes only what was unfinished; a changed source is redone;
- parallel: ``--workers`` processes (one thread each);
- a volume that cannot be read or preprocessed is reported by name and skipped; the others are stored; the exit
  status is 1 if any failed (they are listed in the manifest's ``failed``), 0 otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from hybridmim_components.utils.atomic_files import atomic_open  # noqa: E402
from hybridmim_components.workflow.pool_store import MANIFEST, STORE_FORMAT  # noqa: E402
from tools.data.file_identity import sha256_of  # noqa: E402

TRANSFORMS_ID = "train#deterministic_transforms"
_WORKER: Dict[str, Any] = {}  # per worker process: the parsed transforms


# --- the bundle's own transforms --------------------------------------------------------------------------------
def bundle_parser(bundle_dir: str, overrides: Optional[Dict[str, Any]] = None):
    """``ConfigParser`` of ``<bundle_dir>/configs/train.json`` with ``overrides`` (config ids to values)."""
    from monai.bundle import ConfigParser

    path = os.path.join(bundle_dir, "configs", "train.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{bundle_dir}' is not a pretraining bundle: {path} does not exist.")
    parser = ConfigParser()
    parser.read_config(path)
    parser.update({"bundle_root": os.path.abspath(bundle_dir), **(overrides or {})})
    if TRANSFORMS_ID not in parser:
        raise ValueError(f"{path} has no '{TRANSFORMS_ID}' (the cached part of a pretraining bundle's transforms).")
    return parser


def transforms_fingerprint(parser) -> Dict[str, Any]:
    """The transforms' config with every ``@id`` replaced by its value: what the store's content depends on."""

    def resolve(value):
        if isinstance(value, str) and value.startswith("@"):
            return resolve(parser.get(value[1:]))
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    config = resolve(parser.get(TRANSFORMS_ID))
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return {"transforms": config, "sha256": digest}


def _init_worker(bundle_dir: str, overrides: Dict[str, Any], threads: int) -> None:
    import torch
    from monai.transforms import Compose

    torch.set_num_threads(threads)
    _WORKER["transform"] = Compose(bundle_parser(bundle_dir, overrides).get_parsed_content(TRANSFORMS_ID))


# --- one volume -----------------------------------------------------------------------------------------------------
def _sources(image) -> List[str]:
    return [image] if isinstance(image, str) else list(image)


def case_id(image) -> str:
    """File stem of the (first) source plus a hash of all source paths: unique even for equal names in two folders."""
    paths = [os.path.abspath(p) for p in _sources(image)]
    stem = os.path.basename(paths[0])
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd", ".gz"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return f"{stem}_{hashlib.sha1('|'.join(paths).encode()).hexdigest()[:10]}"


def source_stat(image) -> List[List[int]]:
    """``[size, mtime_ns]`` of each source file."""
    return [[os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in _sources(image)]


def source_hash(image) -> str:
    """SHA-256 of the source file (of the files' hashes, in order, for a multi-file image)."""
    hashes = [sha256_of(p) for p in _sources(image)]
    return hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest()


def _write_json(path: str, obj) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:  # a kill leaves the old file or none, never half of one
        json.dump(obj, f, indent=1)


def preprocess_one(image, store_dir: str, cid: str, fingerprint: str, sha256: Optional[str] = None) -> Dict[str, Any]:
    """Preprocess one volume (in a worker) and write ``volumes/<cid>.npy`` and its record; returns the record.

    Errors are returned as ``{"source": ..., "error": ...}`` instead of raised: one bad file must not stop the pool.
    """
    import numpy as np

    start = time.perf_counter()
    try:
        stat = source_stat(image)
        sha256 = sha256 or source_hash(image)
        out = _WORKER["transform"]({"image": image})["image"]  # C x H x W x D float32 MetaTensor
        array = np.ascontiguousarray(out.numpy(), dtype=np.float32)
        if not np.isfinite(array).all():
            raise ValueError("non-finite voxels after preprocessing")
        rel = os.path.join("volumes", f"{cid}.npy")
        with atomic_open(os.path.join(store_dir, rel), "wb") as f:
            np.save(f, array)
        record = {
            "id": cid,
            "source": image,
            "sha256": sha256,
            "stat": stat,
            "transforms_sha256": fingerprint,
            "file": rel,
            "shape": list(array.shape),
            "dtype": "float32",
            "spacing": [float(s) for s in out.pixdim[: array.ndim - 1]],
            "affine": np.asarray(out.affine, dtype=np.float64).tolist(),
            "bytes": int(os.path.getsize(os.path.join(store_dir, rel))),
            "seconds": round(time.perf_counter() - start, 3),
        }
        _write_json(os.path.join(store_dir, "volumes", f"{cid}.json"), record)  # written last: marks it finished
        return record
    except Exception as err:  # noqa: BLE001 - any failure of this file is reported by name, the pool goes on
        message = str(err).strip().splitlines()
        return {"source": image, "error": f"{type(err).__name__}: {message[-1] if message else ''}"[:500]}


def _finished(image, record_path: str, store_dir: str, fingerprint: str) -> Optional[Dict[str, Any]]:
    """The record of a finished volume still valid for ``image`` (same source content and transforms), else None."""
    if not os.path.isfile(record_path):
        return None
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("transforms_sha256") != fingerprint or record.get("source") != image:
        return None
    if not os.path.isfile(os.path.join(store_dir, record.get("file", ""))):
        return None
    stat = source_stat(image)
    if stat == record.get("stat"):
        return record
    if source_hash(image) == record.get("sha256"):  # touched or copied, same bytes: keep it
        record["stat"] = stat
        _write_json(record_path, record)
        return record
    return None


# --- the pool -------------------------------------------------------------------------------------------------------
def _datalist_sections(dataset_dir: str, data_list_file_path: str, key: str,
                       validation_key: Optional[str]) -> Dict[str, List[Dict[str, Any]]]:
    """``{"training": entries of key, "validation": entries of validation_key}``; a datalist without the validation
    list (or ``validation_key`` None) gives no validation entries."""
    from hybridmim_components.workflow.data import load_datalist, resolve_datalist_path

    sections = {"training": load_datalist(dataset_dir, data_list_file_path, key, check_files=False)}
    if validation_key:
        with open(resolve_datalist_path(dataset_dir, data_list_file_path), encoding="utf-8") as f:
            present = validation_key in json.load(f)
        sections["validation"] = (load_datalist(dataset_dir, data_list_file_path, validation_key, check_files=False)
                                  if present else [])
    return sections


def preprocess_pool(bundle_dir: str, store_dir: str, dataset_dir: str, data_list_file_path: str = "datalist.json",
                    key: str = "training", workers: int = 0, threads: int = 1,
                    overrides: Optional[Dict[str, Any]] = None, log=print,
                    validation_key: Optional[str] = "validation") -> Dict[str, Any]:
    """Build or update the store; returns the manifest (also written to ``<store_dir>/manifest.json``).

    The ``key`` list becomes the manifest's ``volumes`` (training), the ``validation_key`` list its ``validation``
    (``None``: not stored; a run from the store then cannot validate). ``workers`` 0: one process per CPU core.
    """
    overrides = dict(overrides or {})
    sections = _datalist_sections(dataset_dir, data_list_file_path, key, validation_key)
    parser = bundle_parser(bundle_dir, overrides)
    fingerprint = transforms_fingerprint(parser)
    os.makedirs(os.path.join(store_dir, "volumes"), exist_ok=True)

    records: Dict[str, Dict[str, Any]] = {}
    failed: List[Dict[str, Any]] = []
    todo = []
    order: Dict[str, List[str]] = {}  # section -> case ids, in datalist order
    for section, entries in sections.items():
        order[section] = []
        kept_before, todo_before, failed_before = len(records), len(todo), len(failed)
        for entry in entries:
            image = entry["image"]
            missing = [p for p in _sources(image) if not os.path.isfile(p)]
            if missing:
                failed.append({"source": image, "error": f"FileNotFoundError: {missing[0]} does not exist"})
                log(f"skipped {image}: {failed[-1]['error']}")
                continue
            cid = case_id(image)
            if cid in order[section]:
                continue  # listed twice
            order[section].append(cid)
            if cid in records or any(cid == c for _, c in todo):
                continue  # in both lists: stored once
            record = _finished(image, os.path.join(store_dir, "volumes", f"{cid}.json"), store_dir,
                               fingerprint["sha256"])
            if record is not None:
                records[cid] = record
            else:
                todo.append((image, cid))
        log(f"{section}: {len(entries)} volumes listed: {len(records) - kept_before} already in the store, "
            f"{len(todo) - todo_before} to preprocess, {len(failed) - failed_before} missing")
    kept = len(records)

    workers = workers or os.cpu_count() or 1
    args = (os.path.abspath(bundle_dir), overrides, threads)
    start = time.perf_counter()

    def collect(result, done: int) -> None:
        if "error" in result:
            failed.append(result)
            log(f"skipped {result['source']}: {result['error']}")
        else:
            records[result["id"]] = result
            log(f"[{done}/{len(todo)}] {result['id']} {result['shape']} {result['seconds']:.1f} s")

    if workers == 1 or len(todo) <= 1:
        if todo:
            _init_worker(*args)
        for done, (image, cid) in enumerate(todo, 1):
            collect(preprocess_one(image, store_dir, cid, fingerprint["sha256"]), done)
    else:
        import multiprocessing

        # spawn: no fork of a parent holding torch threads
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=args) as pool:
            futures = [pool.submit(preprocess_one, image, store_dir, cid, fingerprint["sha256"]) for image, cid in todo]
            for done, future in enumerate(as_completed(futures), 1):
                collect(future.result(), done)
    elapsed = time.perf_counter() - start

    manifest = {
        "format": STORE_FORMAT,
        "bundle": os.path.basename(os.path.abspath(bundle_dir)),
        "overrides": overrides,
        "dataset_dir": os.path.abspath(dataset_dir),
        "datalist": data_list_file_path,
        "key": key,
        "transforms": fingerprint["transforms"],
        "transforms_sha256": fingerprint["sha256"],
        "volumes": [records[c] for c in order["training"] if c in records],
        "failed": failed,
    }
    if "validation" in order:
        manifest["validation"] = [records[c] for c in order["validation"] if c in records]
    _write_json(os.path.join(store_dir, MANIFEST), manifest)
    new = len(records) - kept
    log(f"store {store_dir}: {len(records)} volumes ({new} preprocessed in {elapsed:.1f} s"
        f"{f', {elapsed / new:.2f} s each with {workers} workers' if new else ''}; {kept} kept), {len(failed)} failed"
        + (": " + ", ".join(str(f["source"]) for f in failed) if failed else ""))
    return manifest


def _parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=JSON_VALUE (e.g. roi_size=[64,64,64]), got {item!r}.")
        k, v = item.split("=", 1)
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v  # a plain string
    return overrides


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle_dir", help="the pretraining bundle whose train#deterministic_transforms are applied")
    ap.add_argument("store_dir", help="where the store is written (the bundle's pool_store_dir)")
    ap.add_argument("--dataset_dir", required=True, help="as for the bundle: the datalist's paths are relative to it")
    ap.add_argument("--data_list_file_path", default="datalist.json")
    ap.add_argument("--key", default="training", help="the datalist list to train on")
    ap.add_argument("--validation_key", default="validation",
                    help="the datalist list to validate on, also stored ('' stores none)")
    ap.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU core)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="bundle config override, the same as given to training (e.g. roi_size=[64,64,64])")
    args = ap.parse_args(argv)
    try:
        manifest = preprocess_pool(args.bundle_dir, args.store_dir, args.dataset_dir, args.data_list_file_path,
                                   args.key, args.workers, args.threads, _parse_overrides(args.set),
                                   validation_key=args.validation_key or None)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if manifest["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
