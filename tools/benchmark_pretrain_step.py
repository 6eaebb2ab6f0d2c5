"""Time one HybridMIM pretraining step (forward, loss, backward, AdamW update; no data loading).

Compares, side by side in one run, the default partial region against full-crop reconstruction (and optionally the
contrastive variants), for each backbone. Steps of the compared settings are interleaved so that machine noise hits
all of them alike; the median of the timed steps is reported.

    python tools/benchmark_pretrain_step.py --backbones unet --crop 96 --region 64 --batch 2 --steps 5
    python tools/benchmark_pretrain_step.py --device cuda --amp --crop 96 --region 64 --batch 4 \\
        --views two_sided one_sided --output tools/results/pretrain_step_gpu.json

Prints one line per setting and the ratio partial/full; ``--output`` writes the figures as JSON (the bundle READMEs
quote them through ``tools/bundlegen/figures.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from hybridmim_components import HierarchicalMaskd, HybridMIMLoss, HybridMIMSwinUNETR, HybridMIMUNet  # noqa: E402


def make_batch(batch: int, channels: int, crop: int, device: torch.device, seed: int = 0) -> dict:
    """A masked batch as the pretrain bundles' transforms produce it (random intensities)."""
    masker = HierarchicalMaskd("image").set_random_state(seed)
    samples = [masker({"image": torch.rand(channels, crop, crop, crop)}) for _ in range(batch)]
    return {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}


def build(backbone: str, channels: int, region: int, views: str, feature_size: int, features: list[int]):
    if backbone == "swin":
        return HybridMIMSwinUNETR(channels, feature_size=feature_size, region_size=region, contrastive_views=views)
    return HybridMIMUNet(channels, features=features, region_size=region, contrastive_views=views)


def step(net, loss_fn, optimizer, batch, amp: bool, device: torch.device) -> None:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, enabled=amp):
        loss = loss_fn(net(batch["image"]), batch)
    loss.backward()
    optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--output", default="")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    batch = make_batch(args.batch, args.channels, args.crop, device)

    settings = []
    for backbone in args.backbones:
        for views in args.views:
            for region in (args.region, args.crop):
                net = build(backbone, args.channels, region, views, args.feature_size, args.features).to(device).train()
                settings.append(
                    {
                        "backbone": backbone,
                        "views": views,
                        "region": region,
                        "net": net,
                        "optimizer": torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5),
                        "times": [],
                        "peak_memory_gib": None,
                    }
                )
    loss_fn = HybridMIMLoss()
    for s in settings:  # warm-up (allocator, cuDNN autotune), and peak memory of one step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step(s["net"], loss_fn, s["optimizer"], batch, args.amp, device)
        sync(device)
        if device.type == "cuda":
            s["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    for _ in range(args.steps):  # interleaved timing
        for s in settings:
            sync(device)
            start = time.perf_counter()
            step(s["net"], loss_fn, s["optimizer"], batch, args.amp, device)
            sync(device)
            s["times"].append(time.perf_counter() - start)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "command": "python tools/benchmark_pretrain_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": device_name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "crop": args.crop,
        "batch": args.batch,
        "channels": args.channels,
        "amp": args.amp,
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
            "region": s["region"],
            "seconds_per_step": median,
            "volumes_per_second": args.batch / median,
            "peak_memory_gib": s["peak_memory_gib"],
            "times": s["times"],
        }
        result["settings"].append(row)
        memory = f", peak {row['peak_memory_gib']:.2f} GiB" if row["peak_memory_gib"] is not None else ""
        print(
            f"{s['backbone']:5s} views={s['views']:9s} region={s['region']:3d}^3 of {args.crop}^3: "
            f"{median:.3f} s/step, {row['volumes_per_second']:.2f} volumes/s{memory}"
        )
    for partial, full in zip(result["settings"][0::2], result["settings"][1::2]):
        ratio = partial["seconds_per_step"] / full["seconds_per_step"]
        result["ratios"].append({"backbone": partial["backbone"], "views": partial["views"], "partial_over_full": ratio})
        print(f"{partial['backbone']:5s} views={partial['views']:9s} partial/full step time: {ratio:.2f}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
