"""Where the pretraining crops come from, for a pool of thousands of CTs: the store candidates side by side.

Generates a simulated pool of ``--n_large`` CTs of clinical size (default 512 × 512 × 200 int16 at 0.8 × 0.8 × 1.5 mm,
uncompressed ``.nii``: a smooth random field inside an elliptic body, air outside, noise) under ``--workdir``, builds
the pool store with ``tools/data/preprocess_pool.py`` (the bundle's own ``train#deterministic_transforms``), and
measures in one run, per candidate, the preprocessing time per CT, the bytes per CT and the crops per second one
loader worker delivers (each sample: ``samples_per_volume`` random crops of one random volume, then
``HierarchicalMaskd``, as the training data loader does):

- ``nifti_on_the_fly``: today's path for volumes past ``cache_num``: load and preprocess the NIfTI at every draw;
- ``cache_dataset``: today's default for the first ``cache_num`` volumes: preprocessed volumes held in RAM;
- ``persistent_dataset``: MONAI ``PersistentDataset`` (the preprocessed volume pickled with ``torch.save``, loaded
  whole at every draw);
- ``npy_memmap``: the pool store (uncompressed float32 ``.npy``, memory-mapped, only the crops read);
- ``blosc2``: the same volumes as blosc2 ``b2nd`` arrays in chunks of the crop size (only when ``blosc2`` imports).

Reads are measured from a cold page cache (each file's cached pages are dropped with ``posix_fadvise`` first). Then
the resident memory of one process drawing the same number of samples from the store's first ``--n_small`` volumes
and from all ``--n_large`` (each in a fresh process). The pool is deleted at the end (unless ``--keep``)::

    python tools/benchmarks/benchmark_pool_store.py --n_small 10 --n_large 200
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
from hybridmim_components.utils.atomic_files import atomic_open

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

RESULTS = os.path.join(REPO_ROOT, "tools", "benchmarks", "results")


# --- the simulated pool ---------------------------------------------------------------------------------------------
def make_pool(out_dir: str, n: int, shape, spacing, seed: int = 0) -> str:
    """``n`` CT-like int16 volumes as uncompressed NIfTI plus ``datalist.json`` (all ``training``); its path."""
    import nibabel as nib
    import torch

    os.makedirs(os.path.join(out_dir, "imagesTr"), exist_ok=True)
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    noise = rng.integers(-40, 41, size=shape, dtype=np.int16)  # drawn once, shifted per CT (cheap)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-like, as DICOM converters write
    training = []
    for i in range(n):
        coarse = torch.from_numpy(rng.random((1, 1, 8, 8, 6), dtype=np.float32))
        field = torch.nn.functional.interpolate(coarse, size=tuple(shape), mode="trilinear")[0, 0].numpy()
        a, b = 0.75 + 0.15 * rng.random(), 0.6 + 0.15 * rng.random()
        body = ((x / a) ** 2 + (y / b) ** 2 <= 1.0)[..., None]
        hu = np.where(body, -150.0 + 400.0 * field, -1000.0).astype(np.int16)
        hu += np.roll(noise, tuple(int(s) for s in rng.integers(0, shape)), axis=(0, 1, 2))
        rel = os.path.join("imagesTr", f"sim_{i:04d}.nii")
        nib.save(nib.Nifti1Image(hu, affine), os.path.join(out_dir, rel))
        training.append({"image": rel})
    path = os.path.join(out_dir, "datalist.json")
    with open(path, "w") as f:
        json.dump({"training": training, "validation": training[:1]}, f)
    return path


def drop_cache(paths) -> None:
    """Evict the files' pages from the page cache (clean pages only; no privileges needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _files(folder: str, suffix: str):
    return [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.endswith(suffix)]


def _rss_mb():
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            status[k] = v
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


# --- the bundle ------------------------------------------------------------------------------------------------------
def bundle_parts(bundle_dir: str, overrides: dict):
    """``(deterministic, crop, rest)``: the bundle's cached transforms, its random crop, the random rest (the mask)."""
    from monai.transforms import Compose

    from tools.data.preprocess_pool import bundle_parser

    parser = bundle_parser(bundle_dir, overrides)
    randoms = parser.get_parsed_content("train#random_transforms")
    return Compose(parser.get_parsed_content("train#deterministic_transforms")), randoms[0], Compose(randoms[1:])


def store_dataset(bundle_dir: str, overrides: dict, store_dir: str, n=None):
    """The bundle's training dataset with ``configs/pool_store.json`` layered (its first ``n`` volumes)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(bundle_dir, "configs", c) for c in ("train.json", "pool_store.json")])
    parser.update({"bundle_root": bundle_dir, "pool_store_dir": store_dir, **overrides})
    if n is not None:
        parser["train#dataset#data"] = parser["train#dataset#data"] + f"[:{int(n)}]"
    return parser.get_parsed_content("train#dataset")


def _draw(get, n_volumes: int, draws: int, seed: int = 0):
    """Time ``draws`` samples ``get(i)`` of random volumes; ``(seconds, crops)``."""
    order = np.random.default_rng(seed).integers(0, n_volumes, size=draws)
    get(int(order[-1]))  # warm-up (first calls build caches), untimed
    crops, start = 0, time.perf_counter()
    for i in order:
        crops += len(get(int(i)))
    return time.perf_counter() - start, crops


# --- candidates ------------------------------------------------------------------------------------------------------
def run(args) -> dict:
    import torch

    torch.set_num_threads(1)  # one loader worker = one core
    from tools.data.preprocess_pool import preprocess_pool

    bundle = os.path.join(REPO_ROOT, "bundles", args.bundle)
    shape, spacing = [int(s) for s in args.shape.split(",")], [float(s) for s in args.spacing.split(",")]
    overrides = {"roi_size": [args.roi] * 3, "samples_per_volume": args.samples}
    work = os.path.abspath(args.workdir)
    if os.path.exists(work):
        shutil.rmtree(work)
    result = {"machine": f"{platform.node()} ({os.cpu_count()} cores shared), {platform.processor() or 'cpu'}",
              "torch_threads": 1, "bundle": args.bundle, "shape": shape, "spacing": spacing, "roi": args.roi,
              "samples_per_volume": args.samples, "n_small": args.n_small, "n_large": args.n_large}
    try:
        start = time.perf_counter()
        datalist = make_pool(os.path.join(work, "ct"), args.n_large, shape, spacing)
        result["generate_s_per_ct"] = (time.perf_counter() - start) / args.n_large
        sources = [os.path.join(work, "ct", e["image"]) for e in json.load(open(datalist))["training"]]
        print(f"generated {args.n_large} CTs in {time.perf_counter() - start:.0f} s", flush=True)

        # the preprocessor over the whole pool
        store = os.path.join(work, "store_npy")
        start = time.perf_counter()
        manifest = preprocess_pool(bundle, store, os.path.join(work, "ct"), datalist, workers=args.workers,
                                   overrides=overrides, log=lambda *_: None)
        wall = time.perf_counter() - start
        records = manifest["volumes"]
        assert len(records) == args.n_large and not manifest["failed"], manifest["failed"]
        result["preprocessor"] = {
            "workers": args.workers, "wall_s_per_ct": wall / args.n_large,
            "worker_s_per_ct": float(np.mean([r["seconds"] for r in records])),
            "stored_shape_mean": [float(v) for v in np.mean([r["shape"] for r in records], axis=0)],
        }
        print(f"preprocessed {args.n_large} CTs in {wall:.0f} s", flush=True)

        deterministic, crop, rest = bundle_parts(bundle, overrides)
        crop.set_random_state(seed=0)
        small = sources[: args.n_small]
        candidates = []

        # nifti_on_the_fly: every draw is a full preprocessing (also gives the volumes for the in-RAM candidates)
        drop_cache(small)
        volumes, det_times, rest_times = [], [], []
        for src in small:
            t = time.perf_counter()
            vol = deterministic({"image": src})
            det_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            _ = [rest(s) for s in crop(vol)]
            rest_times.append(time.perf_counter() - t)
            volumes.append(vol)
        det_s = float(np.mean(det_times))
        candidates.append({"name": "nifti_on_the_fly", "prep_s_per_ct": 0.0,
                           "bytes_per_ct": float(np.mean([os.path.getsize(s) for s in small])),
                           "crops_per_s": args.samples / (det_s + float(np.mean(rest_times))),
                           "note": "preprocessing at every draw (the volumes past cache_num)"})

        # cache_dataset: the same volumes in RAM
        seconds, crops = _draw(lambda i: [rest(s) for s in crop(volumes[i])], len(volumes), args.crops)
        candidates.append({"name": "cache_dataset", "prep_s_per_ct": det_s,
                           "bytes_per_ct": float(np.mean([v["image"].numel() * 4 for v in volumes])),
                           "crops_per_s": crops / seconds,
                           "note": "in RAM: bytes are per process, and preprocessing is redone at every start"})

        # persistent_dataset
        from monai.data import PersistentDataset
        from monai.transforms import Compose

        cache_dir = os.path.join(work, "persistent")
        persistent = PersistentDataset([{"image": s} for s in small], Compose([*deterministic.transforms, crop, rest]),
                                       cache_dir=cache_dir)
        t = time.perf_counter()
        for i in range(len(small)):
            persistent[i]
        prep = (time.perf_counter() - t) / len(small)
        pt_files = _files(cache_dir, ".pt")
        drop_cache(pt_files)
        seconds, crops = _draw(lambda i: persistent[i], len(small), max(2, args.crops // 4))
        candidates.append({"name": "persistent_dataset", "prep_s_per_ct": prep,
                           "bytes_per_ct": float(np.mean([os.path.getsize(p) for p in pt_files])),
                           "crops_per_s": crops / seconds,
                           "note": f"whole volume unpickled at every draw; the first {args.n_small} volumes"})

        # npy_memmap: the pool store, read through the bundle's own pool_store.json over the whole pool
        t = time.perf_counter()
        for i, v in enumerate(volumes):
            np.save(os.path.join(work, f"write_test_{i}.npy"), v["image"].numpy())
        npy_write = (time.perf_counter() - t) / len(volumes)
        for i in range(len(volumes)):
            os.remove(os.path.join(work, f"write_test_{i}.npy"))
        dataset = store_dataset(bundle, overrides, store)
        drop_cache(_files(store, ".npy"))
        seconds, crops = _draw(lambda i: dataset[i], len(dataset), args.crops)
        candidates.append({"name": "npy_memmap", "prep_s_per_ct": det_s + npy_write,
                           "bytes_per_ct": float(np.mean([r["bytes"] for r in records])),
                           "crops_per_s": crops / seconds,
                           "note": f"the pool store (madvise WILLNEED, then copy); reads over all {args.n_large} volumes"})
        # the same store over the first n_small volumes only: like for like with PersistentDataset and blosc2
        dataset_small = store_dataset(bundle, overrides, store, args.n_small)
        drop_cache(_files(store, ".npy"))
        seconds, crops = _draw(lambda i: dataset_small[i], len(dataset_small), args.crops, seed=3)
        candidates.append({"name": "npy_memmap_first_volumes", "prep_s_per_ct": det_s + npy_write,
                           "bytes_per_ct": float(np.mean([r["bytes"] for r in records])),
                           "crops_per_s": crops / seconds,
                           "note": f"the pool store read over the first {args.n_small} volumes, like the two "
                           "candidates read from those alone"})
        faults = _FaultCrops([os.path.join(store, r["file"]) for r in records], args.roi, args.samples, rest)
        drop_cache(_files(store, ".npy"))
        seconds, crops = _draw(faults, len(records), args.crops, seed=2)
        candidates.append({"name": "npy_memmap_page_faults", "prep_s_per_ct": det_s + npy_write,
                           "bytes_per_ct": float(np.mean([r["bytes"] for r in records])),
                           "crops_per_s": crops / seconds,
                           "note": "the same store read by plain page faults (no WILLNEED)"})

        # blosc2, chunks of the crop size
        try:
            import blosc2
        except ImportError:
            blosc2 = None
        if blosc2 is not None:
            b2_dir = os.path.join(work, "blosc2")
            os.makedirs(b2_dir)
            paths = []
            t = time.perf_counter()
            for i, v in enumerate(volumes):
                paths.append(os.path.join(b2_dir, f"{i}.b2nd"))
                blosc2.asarray(np.ascontiguousarray(v["image"].numpy()), urlpath=paths[-1], mode="w",
                               chunks=(1, args.roi, args.roi, args.roi), blocks=(1, 32, 32, 32),
                               cparams={"codec": blosc2.Codec.LZ4, "clevel": 5})
            b2_write = (time.perf_counter() - t) / len(volumes)
            affines = [np.asarray(v["image"].affine) for v in volumes]
            reader = _Blosc2Crops(paths, affines, args.roi, args.samples, rest)
            drop_cache(paths)
            seconds, crops = _draw(reader, len(paths), args.crops)
            candidates.append({"name": "blosc2", "prep_s_per_ct": det_s + b2_write,
                               "bytes_per_ct": float(np.mean([os.path.getsize(p) for p in paths])),
                               "crops_per_s": crops / seconds,
                               "note": f"LZ4 level 5, chunks {args.roi}³, blocks 32³; blosc2 {blosc2.__version__}; the first "
                               f"{args.n_small} volumes"})
        del volumes
        result["candidates"] = candidates

        # resident memory of one process drawing the same number of samples from a small and a large pool
        draws = max(args.n_large * 2, 20)
        result["rss_mb"] = {}
        for label, n in (("small", args.n_small), ("large", args.n_large)):
            out = subprocess.run([sys.executable, __file__, "--rss_child", store, "--bundle", args.bundle,
                                  "--roi", str(args.roi), "--samples", str(args.samples), "--child_volumes", str(n),
                                  "--crops", str(draws)], capture_output=True, text=True, check=True)
            result["rss_mb"][label] = json.loads(out.stdout.strip().splitlines()[-1])
        small_rss, large_rss = result["rss_mb"]["small"]["rss_after_mb"], result["rss_mb"]["large"]["rss_after_mb"]
        result["rss_large_over_small"] = large_rss / small_rss
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    crops_per_step = 2 * args.samples  # the paper's batch: 2 volumes x 2 crops of 96^3 per GPU step
    store_rate = next(c["crops_per_s"] for c in candidates if c["name"] == "npy_memmap")
    result["gpu"] = {
        "assumed_step_s": args.step_seconds, "crops_per_step": crops_per_step,
        "crops_per_s_consumed": crops_per_step / args.step_seconds,
        "store_worker_over_consumed": store_rate / (crops_per_step / args.step_seconds),
        "fastest_step_fed_4x_by_one_worker_s": 4 * crops_per_step / store_rate,
    }
    return result


class _FaultCrops:
    """Random crops copied out of ``np.load(mmap_mode="r")``: every missing page is one synchronous fault."""

    def __init__(self, paths, roi, samples, rest):
        self.paths, self.roi, self.samples, self.rest = paths, roi, samples, rest
        self.rng = np.random.RandomState(0)

    def __call__(self, i):
        import torch
        from monai.data import MetaTensor

        volume = np.load(self.paths[i], mmap_mode="r")
        out = []
        for _ in range(self.samples):
            corner = [int(self.rng.randint(0, s - self.roi + 1)) for s in volume.shape[1:]]
            crop = np.array(volume[(slice(None), *(slice(c, c + self.roi) for c in corner))])
            out.append(self.rest({"image": MetaTensor(torch.from_numpy(crop))}))
        del volume
        return out


class _Blosc2Crops:
    """Random crops (as ``PoolRandCropSamplesd`` draws them) from blosc2 arrays, then the rest of the transforms."""

    def __init__(self, paths, affines, roi, samples, rest):
        self.paths, self.affines, self.roi, self.samples, self.rest = paths, affines, roi, samples, rest
        self.rng = np.random.RandomState(0)

    def __call__(self, i):
        import blosc2
        import torch
        from monai.data import MetaTensor

        array = blosc2.open(self.paths[i])
        out = []
        for _ in range(self.samples):
            corner = [int(self.rng.randint(0, s - self.roi + 1)) for s in array.shape[1:]]
            crop = array[(slice(None), *(slice(c, c + self.roi) for c in corner))]
            shift = np.eye(4)
            shift[:3, 3] = corner
            out.append(self.rest({"image": MetaTensor(torch.from_numpy(np.ascontiguousarray(crop)),
                                                      affine=torch.as_tensor(self.affines[i] @ shift))}))
        return out


def rss_child(args) -> None:
    """In a fresh process: draw ``--crops`` samples from the first ``--child_volumes`` volumes of the store."""
    import torch

    torch.set_num_threads(1)
    overrides = {"roi_size": [args.roi] * 3, "samples_per_volume": args.samples}
    dataset = store_dataset(os.path.join(REPO_ROOT, "bundles", args.bundle), overrides, args.rss_child,
                            args.child_volumes)
    dataset[0]
    before = _rss_mb()[0]
    _draw(lambda i: dataset[i], len(dataset), args.crops, seed=1)
    rss, hwm = _rss_mb()
    print(json.dumps({"volumes": len(dataset), "draws": args.crops, "rss_before_mb": before, "rss_after_mb": rss,
                      "peak_rss_mb": hwm}))


def markdown(result: dict, command: str) -> str:
    gpu = result["gpu"]
    lines = [
        "# Pool store candidates (measured side by side in one run)",
        "",
        f"`{command}` on {result['machine']}, one torch thread (one loader worker). Pool: {result['n_large']} "
        f"simulated CTs of {'×'.join(map(str, result['shape']))} int16 at {'×'.join(map(str, result['spacing']))} mm "
        f"(uncompressed .nii), bundle `{result['bundle']}` (resampled to its 1.5 × 1.5 × 2.0 mm); each sample is "
        f"{result['samples_per_volume']} random {result['roi']}³ crops of a random volume plus the mask; reads from a "
        "cold page cache.",
        "",
        "| candidate | preprocessing s/CT | MB/CT | crops/s per worker | note |",
        "|---|---|---|---|---|",
    ]
    for c in result["candidates"]:
        lines.append(f"| {c['name']} | {c['prep_s_per_ct']:.2f} | {c['bytes_per_ct'] / 1e6:.1f} | "
                     f"{c['crops_per_s']:.1f} | {c['note']} |")
    pre, rss = result["preprocessor"], result["rss_mb"]
    lines += [
        "",
        f"Preprocessor (`tools/data/preprocess_pool.py`, {pre['workers']} workers) over all {result['n_large']} CTs: "
        f"{pre['wall_s_per_ct']:.2f} s/CT wall, {pre['worker_s_per_ct']:.2f} s/CT per worker (hash, transforms, "
        f"write); stored volume {' × '.join(f'{s:.0f}' for s in pre['stored_shape_mean'][1:])} voxels on average.",
        "",
        f"Resident memory of one process reading from the store, {rss['small']['draws']} samples each: "
        f"{rss['small']['rss_after_mb']:.0f} MB with {rss['small']['volumes']} volumes, "
        f"{rss['large']['rss_after_mb']:.0f} MB with {rss['large']['volumes']} "
        f"(ratio {result['rss_large_over_small']:.3f}; peaks {rss['small']['peak_rss_mb']:.0f} and "
        f"{rss['large']['peak_rss_mb']:.0f} MB).",
        "",
        f"GPU demand assumed: {gpu['crops_per_step']} crops per step at {gpu['assumed_step_s']} s/step = "
        f"{gpu['crops_per_s_consumed']:.1f} crops/s; one store worker delivers "
        f"{gpu['store_worker_over_consumed']:.1f}× that, and feeds steps down to "
        f"{gpu['fastest_step_fed_4x_by_one_worker_s']:.3f} s with a 4× margin.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n_small", type=int, default=10)
    ap.add_argument("--n_large", type=int, default=200)
    ap.add_argument("--shape", default="512,512,200")
    ap.add_argument("--spacing", default="0.8,0.8,1.5")
    ap.add_argument("--roi", type=int, default=96)
    ap.add_argument("--samples", type=int, default=2, help="crops per volume (the bundles' samples_per_volume)")
    ap.add_argument("--crops", type=int, default=64, help="samples drawn per candidate")
    ap.add_argument("--workers", type=int, default=2, help="preprocessor processes")
    ap.add_argument("--bundle", default="hybridmim_swin_pretrain")
    ap.add_argument("--step_seconds", type=float, default=0.3, help="assumed GPU step time at the paper's settings")
    ap.add_argument("--workdir", default="/tmp/pool_store_benchmark")
    ap.add_argument("--json", default=os.path.join(RESULTS, "pool_store.json"))
    ap.add_argument("--markdown", default=os.path.join(RESULTS, "pool_store.md"))
    ap.add_argument("--keep", action="store_true", help="keep the simulated pool")
    ap.add_argument("--rss_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child_volumes", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return 0
    if args.n_small > args.n_large:
        ap.error(f"--n_small {args.n_small} must not exceed --n_large {args.n_large}")
    result = run(args)
    command = "python tools/benchmarks/benchmark_pool_store.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["command"] = command.strip()
    for path, text in ((args.json, json.dumps(result, indent=1)), (args.markdown, markdown(result, command.strip()))):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_open(path, "w") as f:
            f.write(text + "\n")
    print(markdown(result, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
