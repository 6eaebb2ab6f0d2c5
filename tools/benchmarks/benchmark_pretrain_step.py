"""Time one HybridMIM pretraining step (forward, loss, backward, AdamW update; no data loading), and what surrounds it.

Compares, side by side in one run, the default partial region against full-crop reconstruction (and optionally the
contrastive variants), for each backbone. Steps of the compared settings are interleaved so that machine noise hits
all of them alike; the median of the timed steps is reported. On CUDA every setting is timed in float32 and with AMP
(``--precisions``, autocast ``--amp-dtype`` and a GradScaler as MONAI's trainer uses them), interleaved as well; on
CPU AMP is not measured.

Optional parts, in the same run and the same JSON:

- ``--loader``: crops/s of the pretraining bundle's own data pipeline (``train#dataset`` and ``train#dataloader``
  of its ``train.json``, built with ``monai.bundle.ConfigParser``, the bundle's worker count unless
  ``--loader-workers``) on ``--datalist`` or on a generated CT pool (``tools/data/make_demo_data.py pool``), printed
  against the step rate: whichever is lower limits training.
- ``--inference``: sliding-window inference (``SlidingWindowInferer``, ``--infer-roi`` 96, overlap 0.5, the
  bundle's ``sw_batch_size``) of a finetuning bundle's network on a ``--infer-volume`` (256×256×128) volume.
- ``--profile``: the step split into stages (encoder, heads and embedding, coarse decoder stage, cropped decoder,
  loss, the backward of each, optimizer), each stage's time and share of the step; the timed float32 steps are
  then these staged steps (same arithmetic, a few more synchronisations).
- peak memory: ``torch.cuda.max_memory_allocated`` per setting on CUDA; on CPU the process's maximum resident set
  (``resource.getrusage``) after each part (it only grows, so it is the largest part's peak).

    python tools/benchmarks/benchmark_pretrain_step.py --backbones unet --crop 96 --region 64 --batch 2 --steps 5
    python tools/benchmarks/benchmark_pretrain_step.py --device cuda --crop 96 --region 64 --batch 4 --loader --inference \\
        --views two_sided one_sided --output tools/benchmarks/results/pretrain_step_gpu.json
    python tools/benchmarks/benchmark_pretrain_step.py --backbones unet --batch 2 --steps 1 --views two_sided one_sided \\
        --profile --output tools/benchmarks/results/pretrain_profile_cpu_unet.json

Prints one line per setting and the ratio partial/full; ``--output`` writes the figures as JSON (the bundle READMEs
quote them through ``tools/bundles/bundlegen/figures.py``); ``device`` names the machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from hybridmim_components import HierarchicalMaskd, HybridMIMLoss, HybridMIMSwinUNETR, HybridMIMUNet  # noqa: E402
from hybridmim_components.workflow.mixed_precision import amp_kwargs  # noqa: E402
from hybridmim_components.networks import crop_to_region  # noqa: E402
from hybridmim_components.utils.atomic_files import atomic_open  # noqa: E402

BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
PRECISIONS = ("fp32", "amp")


def make_batch(batch: int, channels: int, crop: int, device: torch.device, seed: int = 0) -> dict:
    """A masked batch as the pretrain bundles' transforms produce it (random intensities)."""
    masker = HierarchicalMaskd("image").set_random_state(seed)
    samples = [masker({"image": torch.rand(channels, crop, crop, crop)}) for _ in range(batch)]
    return {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}


def build(backbone: str, channels: int, region: int, views: str, feature_size: int, features: list[int]):
    if backbone == "swin":
        return HybridMIMSwinUNETR(channels, feature_size=feature_size, region_size=region, contrastive_views=views)
    return HybridMIMUNet(channels, features=features, region_size=region, contrastive_views=views)


def step(net, loss_fn, optimizer, batch, amp: bool, device: torch.device, scaler=None, amp_dtype=None) -> None:
    """One training step as MONAI's ``SupervisedTrainer`` does it (autocast and a GradScaler with AMP)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, enabled=amp, **(amp_kwargs(amp_dtype) if amp and amp_dtype else {})):
        loss = loss_fn(net(batch["image"]), batch)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


# ------------------------------------------------------------------------------------------------ staged profile
#: stage names of :func:`staged_step`, in execution order
STAGES = (
    "encoder",
    "second view (no grad)",
    "heads + embedding",
    "coarse decoder stage",
    "cropped decoder",
    "loss",
    "backward: loss",
    "backward: cropped decoder",
    "backward: heads + embedding",
    "backward: coarse decoder stage",
    "backward: encoder",
    "optimizer",
)


def decoder_stages(net) -> tuple[Callable, Callable]:
    """The network's ``forward_decoder`` as two calls: the coarse stage on the whole bottleneck grid (then cropped to
    the region), and the stages that run on the region alone. ``tests/test_benchmark.py`` checks that they compose
    to ``forward_decoder``."""
    bb = net.backbone
    if isinstance(net, HybridMIMUNet):

        def coarse(features, region):
            return crop_to_region(bb.upcat_4(features[4], features[3]), region, 8)

        def fine(coarse_out, features, region):
            u3 = bb.upcat_3(coarse_out, crop_to_region(features[2], region, 4))
            u2 = bb.upcat_2(u3, crop_to_region(features[1], region, 2))
            u1 = bb.upcat_1(u2, crop_to_region(features[0], region, 1))
            return bb.final_conv(u1)

        return coarse, fine

    def coarse(features, region):  # SwinUNETR: features = [x, hs0, hs1, hs2, hs3, hs4]
        return crop_to_region(bb.decoder5(bb.encoder10(features[5]), features[4]), region, 16)

    def fine(coarse_out, features, region):
        x, hs0, hs1, hs2 = features[:4]
        dec2 = bb.decoder4(coarse_out, bb.encoder4(crop_to_region(hs2, region, 8)))
        dec1 = bb.decoder3(dec2, bb.encoder3(crop_to_region(hs1, region, 4)))
        dec0 = bb.decoder2(dec1, bb.encoder2(crop_to_region(hs0, region, 2)))
        return bb.out(bb.decoder1(dec0, bb.encoder1(crop_to_region(x, region, 1))))

    return coarse, fine


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A stage boundary: the tensor cut from the graph before it, collecting the gradient of what comes after."""
    return t.detach().requires_grad_(t.requires_grad)


def _backward(outputs, leaves) -> None:
    """Continue the backward pass from a boundary: each output gets the gradient its leaf collected."""
    pairs = [(o, l.grad) for o, l in zip(outputs, leaves) if o.requires_grad and l.grad is not None]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def staged_step(net, loss_fn, optimizer, batch, device: torch.device) -> tuple[torch.Tensor, dict]:
    """The float32 training step of ``net.forward`` + ``loss_fn`` + ``optimizer``, cut into timed :data:`STAGES`.

    Every stage's outputs are detached into leaves, so each backward runs alone: the backward of a stage starts from
    the gradient its outputs' leaves collected. The arithmetic and the random draws (dropout) happen in the same
    order as in ``net(x)``: the loss and the gradients equal those of :func:`step` (tested). Returns the loss and
    ``{stage: seconds}``.
    """
    times = dict.fromkeys(STAGES, 0.0)

    def timed(name, fn):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times[name] += time.perf_counter() - start
        return out

    x = batch["image"]
    b = x.shape[0]
    region = net.check_crop(x.shape[2:])
    views = net.contrastive_views if net.training else "none"
    coarse, fine = decoder_stages(net)
    optimizer.zero_grad(set_to_none=True)

    encoded = timed("encoder", lambda: net.forward_encoder(torch.cat([x, x]) if views == "two_sided" else x))
    enc_leaves = [_leaf(f) for f in encoded]
    features = [f[:b] for f in enc_leaves] if views == "two_sided" else enc_leaves
    second = None
    if views == "one_sided":

        def second_view():
            with torch.no_grad():
                return net.forward_embedding(net.forward_encoder(x)[-1])

        second = timed("second view (no grad)", second_view)

    def heads():
        number, location = net.forward_heads(features[-1])
        if views == "two_sided":
            embeddings = net.forward_embedding(enc_leaves[-1]).split(b, dim=0)
        elif views == "one_sided":
            embeddings = (net.forward_embedding(features[-1]),)
        else:
            embeddings = ()
        return [number, location, *embeddings]

    head_out = timed("heads + embedding", heads)
    coarse_out = timed("coarse decoder stage", lambda: coarse(features, region))
    coarse_leaf = _leaf(coarse_out)
    recon = timed("cropped decoder", lambda: fine(coarse_leaf, features, region))

    recon_leaf, head_leaves = _leaf(recon), [_leaf(h) for h in head_out]
    embeddings = None
    if views == "two_sided":
        embeddings = (head_leaves[2], head_leaves[3])
    elif views == "one_sided":
        embeddings = (head_leaves[2], second)
    outputs = {"reconstruction": recon_leaf, "region_slices": region, "number_logits": head_leaves[0],
               "location_logits": head_leaves[1], "embeddings": embeddings}
    loss = timed("loss", lambda: loss_fn(outputs, batch))

    timed("backward: loss", loss.backward)
    timed("backward: cropped decoder", lambda: _backward([recon], [recon_leaf]))
    timed("backward: heads + embedding", lambda: _backward(head_out, head_leaves))
    timed("backward: coarse decoder stage", lambda: _backward([coarse_out], [coarse_leaf]))
    timed("backward: encoder", lambda: _backward(encoded, enc_leaves))
    timed("optimizer", optimizer.step)
    return loss.detach(), times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_gib() -> float:
    """Largest resident set of this process so far, GiB (``ru_maxrss``, KiB on Linux). Data-loader workers are left
    out: they are forked, so their own maximum counts the parent's pages they share."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine() or 'unknown'}"


# ------------------------------------------------------------------------------------------------ data loading
def _bundle_parser(bundle: str, overrides: dict):
    from monai.bundle import ConfigParser

    path = os.path.join(BUNDLES_DIR, bundle, "configs", "train.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"bundle config '{path}' not found (--bundle / --infer-bundle names a bundle folder).")
    parser = ConfigParser()
    parser.read_config(path)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def measure_loader(
    bundle: str = "hybridmim_unet_pretrain",
    datalist: str = "",
    workers: int | None = None,
    batches: int = 20,
    roi: int | None = None,
    pool_volumes: int = 4,
    pool_shape: tuple[int, int, int] = (192, 192, 96),
) -> dict:
    """Crops/s of a pretraining bundle's training data pipeline, as its trainer draws it.

    ``train#dataset`` (``CacheDataset``: the deterministic transforms, run once per volume; timed as ``cache_*``) and
    ``train#dataloader`` (random crops and masking in ``num_workers`` processes, ``batch_size`` volumes ×
    ``samples_per_volume`` crops per batch) are built from the bundle's ``train.json``. The cached list is repeated
    (``ConcatDataset``, same cache) so that ``batches`` batches come from one pass: worker start-up is timed apart
    (``first_batch_seconds``). Without ``datalist`` a CT pool of ``pool_volumes`` volumes of ``pool_shape`` voxels
    (1.5 × 1.5 × 2.0 mm) is generated.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if not datalist:
            from tools.data.make_demo_data import make_unlabeled_ct_pool

            datalist = make_unlabeled_ct_pool(tmp, n_train=pool_volumes, n_val=0, n_test=0, shape=pool_shape)
        overrides = {"dataset_dir": os.path.dirname(os.path.abspath(datalist)),
                     "data_list_file_path": os.path.abspath(datalist)}
        if roi:
            overrides["roi_size"] = [roi] * 3
        if workers is not None:
            overrides["train#dataloader#num_workers"] = workers
        parser = _bundle_parser(bundle, overrides)
        volumes = len(parser.get_parsed_content("train#dataset#data"))
        repeats = math.ceil((batches + 1) * parser.get_parsed_content("batch_size") / volumes)
        # set before anything is built: a later override would make the parser build (and cache) the dataset again
        parser["train#dataloader#dataset"] = f"$torch.utils.data.ConcatDataset([@train#dataset] * {repeats})"
        start = time.perf_counter()
        loader = parser.get_parsed_content("train#dataloader")  # builds the CacheDataset: the cache is filled here
        cache_seconds = time.perf_counter() - start
        dataset = loader.dataset.datasets[0]
        iterator = iter(loader)
        start = time.perf_counter()
        first = next(iterator)
        first_seconds = time.perf_counter() - start
        crops, shape = 0, list(first["image"].shape)
        start = time.perf_counter()
        for _ in range(batches):
            crops += next(iterator)["image"].shape[0]
        seconds = time.perf_counter() - start
        del iterator
        return {
            "bundle": bundle,
            "datalist": datalist if overrides["dataset_dir"] != tmp else f"generated CT pool, {pool_volumes} volumes "
            f"of {'x'.join(map(str, pool_shape))} voxels",
            "num_workers": loader.num_workers,
            "volumes": len(dataset),
            "cache_seconds": cache_seconds,
            "cache_volumes_per_second": len(dataset) / cache_seconds,
            "batch_shape": shape,
            "first_batch_seconds": first_seconds,
            "batches": batches,
            "crops_per_second": crops / seconds,
            "seconds_per_batch": seconds / batches,
        }


# ------------------------------------------------------------------------------------------------ inference
def measure_inference(
    bundle: str = "hybridmim_unet_btcv",
    volume: tuple[int, int, int] = (256, 256, 128),
    roi: int = 96,
    overlap: float = 0.5,
    device: torch.device = torch.device("cpu"),
    precisions: tuple[str, ...] = ("fp32",),
    amp_dtype: str = "float16",
    width: list | int | None = None,
    repeats: int = 1,
) -> list[dict]:
    """Seconds of one sliding-window inference of a finetuning bundle's network on a ``1×C×volume`` input.

    The network is the bundle's ``network_def`` (width ``width`` when given: ``features`` or ``feature_size``), the
    inferer MONAI's ``SlidingWindowInferer`` with the bundle's ``sw_batch_size``; eval mode, ``inference_mode``,
    autocast for ``"amp"``. A first window is run untimed (allocator, cuDNN). Returns one row per precision.
    """
    from monai.inferers import SlidingWindowInferer

    parser = _bundle_parser(bundle, {})
    if width is not None:
        parser["features" if "features" in parser.config else "feature_size"] = width
    net = parser.get_parsed_content("network_def").to(device).eval()
    in_channels = parser.get_parsed_content("network_def#in_channels")
    sw_batch = parser.get_parsed_content("validate#inferer#sw_batch_size")
    inferer = SlidingWindowInferer(roi_size=[roi] * 3, sw_batch_size=sw_batch, overlap=overlap)
    image = torch.rand(1, in_channels, *volume, device=device)
    rows = []
    for precision in precisions:
        amp = precision == "amp"
        with torch.inference_mode(), torch.autocast(device.type, enabled=amp, **(amp_kwargs(amp_dtype) if amp else {})):
            net(image[(..., *(slice(0, roi),) * 3)])  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                out = inferer(image, net)
                sync(device)
                times.append(time.perf_counter() - start)
        windows = math.prod(math.ceil((n - roi) / (roi * (1 - overlap))) + 1 if n > roi else 1 for n in volume)
        rows.append({
            "bundle": bundle,
            "precision": precision,
            "volume": list(volume),
            "roi": roi,
            "overlap": overlap,
            "sw_batch_size": sw_batch,
            "windows": windows,
            "output_shape": list(out.shape),
            "seconds": statistics.median(times),
            "times": times,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        })
    return rows


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["unet", "swin"], choices=["unet", "swin"])
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--region", type=int, default=64)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--views", nargs="+", default=["two_sided"], choices=["two_sided", "one_sided", "none"])
    parser.add_argument("--feature-size", type=int, default=48, help="SwinUNETR width (paper: 48)")
    parser.add_argument("--features", type=int, nargs=6, default=[32, 32, 64, 128, 256, 32], help="BasicUNet widths")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting (after 1 warm-up step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                        help="fp32 and/or amp (default: both on CUDA, fp32 on CPU)")
    parser.add_argument("--amp", action="store_true", help="same as --precisions amp")
    parser.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--profile", action="store_true", help="time the stages of the step (fp32), see STAGES")
    parser.add_argument("--loader", action="store_true", help="data-loader crops/s of the pretraining bundle")
    parser.add_argument("--bundle", default="", help="pretraining bundle for --loader (default: hybridmim_<backbone>"
                        "_pretrain of the first backbone)")
    parser.add_argument("--datalist", default="", help="datalist for --loader (default: a generated CT pool)")
    parser.add_argument("--loader-workers", type=int, default=None, help="default: the bundle's num_workers")
    parser.add_argument("--loader-batches", type=int, default=20)
    parser.add_argument("--loader-roi", type=int, default=0, help="crop side for --loader (default: the bundle's)")
    parser.add_argument("--pool-shape", type=int, nargs=3, default=[192, 192, 96])
    parser.add_argument("--pool-volumes", type=int, default=4)
    parser.add_argument("--inference", action="store_true", help="sliding-window inference of a finetuning network")
    parser.add_argument("--infer-bundle", default="", help="default: hybridmim_<backbone>_btcv of the first backbone")
    parser.add_argument("--infer-volume", type=int, nargs=3, default=[256, 256, 128])
    parser.add_argument("--infer-roi", type=int, default=96)
    parser.add_argument("--infer-overlap", type=float, default=0.5)
    parser.add_argument("--output", default="")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = ["amp"] if args.amp else args.precisions or (["fp32", "amp"] if device.type == "cuda" else ["fp32"])
    if "amp" in precisions and device.type != "cuda":
        raise SystemExit(f"--precisions amp needs a CUDA device (MONAI's trainer autocasts on CUDA only), got {device}.")
    amp_note = None if "amp" in precisions else f"{device.type.upper()}: AMP not measured"
    torch.manual_seed(0)
    batch = make_batch(args.batch, args.channels, args.crop, device)

    settings = []
    for backbone in args.backbones:
        for views in args.views:
            for precision in precisions:
                for region in (args.region, args.crop):
                    net = build(backbone, args.channels, region, views, args.feature_size, args.features)
                    net = net.to(device).train()
                    amp = precision == "amp"
                    settings.append(
                        {
                            "backbone": backbone,
                            "views": views,
                            "precision": precision,
                            "region": region,
                            "net": net,
                            "optimizer": torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5),
                            "scaler": torch.amp.GradScaler(device.type) if amp and args.amp_dtype == "float16"
                            else None,
                            "amp": amp,
                            "times": [],
                            "stages": [],
                            "peak_memory_gib": None,
                        }
                    )
    loss_fn = HybridMIMLoss()

    def run_step(s):
        if args.profile and not s["amp"]:
            s["stages"].append(staged_step(s["net"], loss_fn, s["optimizer"], batch, device)[1])
        else:
            step(s["net"], loss_fn, s["optimizer"], batch, s["amp"], device, s["scaler"], args.amp_dtype)

    for s in settings:  # warm-up (allocator, cuDNN autotune), and peak memory of one step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step(s["net"], loss_fn, s["optimizer"], batch, s["amp"], device, s["scaler"], args.amp_dtype)
        sync(device)
        if device.type == "cuda":
            s["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    for _ in range(args.steps):  # interleaved timing
        for s in settings:
            sync(device)
            start = time.perf_counter()
            run_step(s)
            sync(device)
            s["times"].append(time.perf_counter() - start)

    result = {
        "command": "python tools/benchmarks/benchmark_pretrain_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "crop": args.crop,
        "batch": args.batch,
        "channels": args.channels,
        "amp": "amp" in precisions,
        "amp_dtype": args.amp_dtype if "amp" in precisions else None,
        "precisions": precisions,
        "amp_note": amp_note,
        "feature_size": args.feature_size,
        "features": args.features,
        "settings": [],
        "ratios": [],
    }
    for s in settings:
        median = statistics.median(s["times"])
        row = {
            "backbone": s["backbone"],
            "views": s["views"],
            "precision": s["precision"],
            "region": s["region"],
            "seconds_per_step": median,
            "volumes_per_second": args.batch / median,
            "peak_memory_gib": s["peak_memory_gib"],
            "times": s["times"],
        }
        if s["stages"]:
            row["stage_seconds"] = {k: statistics.median(t[k] for t in s["stages"]) for k in STAGES}
        result["settings"].append(row)
        memory = f", peak {row['peak_memory_gib']:.2f} GiB" if row["peak_memory_gib"] is not None else ""
        print(
            f"{s['backbone']:5s} views={s['views']:9s} {s['precision']:4s} region={s['region']:3d}^3 of {args.crop}^3: "
            f"{median:.3f} s/step, {row['volumes_per_second']:.2f} volumes/s{memory}"
        )
    for partial, full in zip(result["settings"][0::2], result["settings"][1::2]):
        ratio = partial["seconds_per_step"] / full["seconds_per_step"]
        result["ratios"].append({"backbone": partial["backbone"], "views": partial["views"],
                                 "precision": partial["precision"], "partial_over_full": ratio})
        print(f"{partial['backbone']:5s} views={partial['views']:9s} {partial['precision']:4s} "
              f"partial/full step time: {ratio:.2f}")
    by_key = {(r["backbone"], r["views"], r["precision"], r["region"]): r for r in result["settings"]}
    for (backbone, views, precision, region), row in by_key.items():
        one = by_key.get((backbone, "one_sided", precision, region))
        if views == "two_sided" and one is not None:
            ratio = row["seconds_per_step"] / one["seconds_per_step"]
            result.setdefault("two_sided_over_one_sided", []).append(
                {"backbone": backbone, "precision": precision, "region": region, "ratio": ratio})
            print(f"{backbone:5s} {precision:4s} region={region:3d}^3: two-sided/one-sided step time: {ratio:.2f}")
        if precision == "amp" and (backbone, views, "fp32", region) in by_key:
            ratio = row["seconds_per_step"] / by_key[(backbone, views, "fp32", region)]["seconds_per_step"]
            result.setdefault("amp_over_fp32", []).append(
                {"backbone": backbone, "views": views, "region": region, "ratio": ratio})
            print(f"{backbone:5s} views={views:9s} region={region:3d}^3: AMP/fp32 step time: {ratio:.2f}")
    if amp_note:
        print(amp_note)
    if args.profile:
        result["stages"] = list(STAGES)
        print_profile(result["settings"])
    result["max_rss_gib"] = {"after_steps": max_rss_gib()}

    if args.loader:
        loader = measure_loader(args.bundle or f"hybridmim_{args.backbones[0]}_pretrain", args.datalist,
                                args.loader_workers, args.loader_batches, args.loader_roi or None, args.pool_volumes,
                                tuple(args.pool_shape))
        step_rate = max(r["volumes_per_second"] for r in result["settings"] if r["backbone"] == args.backbones[0])
        loader["fastest_step_volumes_per_second"] = step_rate
        loader["limited_by"] = "data loading" if loader["crops_per_second"] < step_rate else "the training step"
        result["loader"] = loader
        result["max_rss_gib"]["after_loader"] = max_rss_gib()
        print(f"data loader ({loader['bundle']}, {loader['num_workers']} workers): {loader['crops_per_second']:.2f} "
              f"crops/s (cache: {loader['cache_volumes_per_second']:.2f} volumes/s) vs fastest step "
              f"{step_rate:.2f} volumes/s: limited by {loader['limited_by']}")
    if args.inference:
        rows = measure_inference(args.infer_bundle or f"hybridmim_{args.backbones[0]}_btcv",
                                 tuple(args.infer_volume), args.infer_roi, args.infer_overlap, device, tuple(precisions),
                                 args.amp_dtype, args.features if args.backbones[0] == "unet" else args.feature_size)
        result["inference"] = rows
        result["max_rss_gib"]["after_inference"] = max_rss_gib()
        for r in rows:
            memory = f", peak {r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else ""
            print(f"sliding window ({r['bundle']}, {r['precision']}): {'x'.join(map(str, r['volume']))} volume, roi "
                  f"{r['roi']}, overlap {r['overlap']}, {r['windows']} windows: {r['seconds']:.2f} s{memory}")
    if device.type == "cpu":
        print("max resident memory of this process (GiB): " + ", ".join(
            f"{part} {v:.2f}" for part, v in result["max_rss_gib"].items()))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with atomic_open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def print_profile(rows: list[dict]) -> None:
    """One column per profiled setting: seconds and share of the step per stage."""
    rows = [r for r in rows if "stage_seconds" in r]
    if not rows:
        return
    heads = [f"{r['views']} {r['region']}^3" for r in rows]
    print(f"{'stage':32s}" + "".join(f"{h:>22s}" for h in heads))
    for stage in STAGES:
        cells = []
        for r in rows:
            t, total = r["stage_seconds"][stage], sum(r["stage_seconds"].values())
            cells.append(f"{t:9.3f} s {100 * t / total:6.1f} %  ")
        print(f"{stage:32s}" + "".join(f"{c:>22s}" for c in cells))
    print(f"{'sum of stages':32s}" + "".join(f"{sum(r['stage_seconds'].values()):9.3f} s {'':10s}" for r in rows))


if __name__ == "__main__":
    main()
