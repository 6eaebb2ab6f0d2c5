"""One command for the day a GPU is lent: every bundle family at the paper's settings, in fp32, fp16 and bf16.

    python tools/gpu_check.py              # on a CUDA machine: paper settings, <= 8 min on one H100/H200
    python tools/gpu_check.py --tiny       # tiny widths and crops (automatic without CUDA; it says so)

For each bundle (pretraining: Swin and UNet, CT and BraTS; finetuning: Swin and UNet, BTCV) the network, loss and
batch are built from the bundle's own ``configs/train.json`` with ``monai.bundle.ConfigParser``
(``tools/benchmarks/compute_step_cost.training_parts``), so crop, width, crops per step and the contrastive views
are the bundle defaults and cannot drift. Each is trained a few steps (AdamW; fp16 with a GradScaler, as MONAI's
trainer does) with autocast off (fp32), fp16 and bf16; the batch stays on the device (no data loading). Reported per
setting: s/step (median of the timed steps), volumes (crops)/s, peak GPU memory (``torch.cuda.max_memory_allocated``),
FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode`` on the first warm-up step), the achieved TFLOP/s, and
the steps skipped for NaN/inf gradients (skipped as the bundles' guard skips them; every precision starts from the
same initial weights).
Then, per finetuning bundle, sliding-window inference of a 512×512×200 CT with its ``validate#inferer``
(``SlidingWindowInferer``: roi, ``sw_batch_size``, overlap) under its own AMP setting; and a one-process DDP start
(NCCL on CUDA, gloo on CPU): process group, ``DistributedDataParallel``, one step, an all-reduce.

Writes ``tools/results/gpu_check_<device>.{json,md}`` (``--output-dir``) after every setting, so a run cut short
keeps what it measured; names the GPU. A setting that fails (out of memory) is recorded with its error and the run
goes on; settings past ``--time-budget`` seconds are recorded as skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tools.benchmarks.compute_step_cost import bundle_parser, count_step, to_device, training_parts  # noqa: E402
from hybridmim_components.utils.atomic_files import atomic_open  # noqa: E402

#: family -> bundles checked (the BraTS pretraining bundles: same networks, 4 channels, 128³ crops)
FAMILIES = {
    "swin pretrain": ("hybridmim_swin_pretrain", "hybridmim_swin_pretrain_brats"),
    "unet pretrain": ("hybridmim_unet_pretrain", "hybridmim_unet_pretrain_brats"),
    "swin finetune": ("hybridmim_swin_btcv",),
    "unet finetune": ("hybridmim_unet_btcv",),
}
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
CT_VOLUME = (512, 512, 200)
#: the tiny settings (tests, CPU): widths of the bundle tests, the smallest crops the networks take
TINY_OVERRIDES = {"feature_size": 12, "features": [4, 4, 8, 8, 16, 4], "batch_size": 1, "samples_per_volume": 1,
                  "num_samples": 1}
TINY_CROP = {"swin": 64, "unet": 32}  # Swin's bottleneck is 1/32 of the crop, and must hold more than one voxel
TINY_VOLUME = (80, 72, 40)
DEFAULT_OUTPUT_DIR = os.path.join(REPO_ROOT, "tools", "results")


def tiny_overrides(name: str) -> dict:
    crop = TINY_CROP["swin" if "_swin_" in name else "unet"]
    overrides = {**TINY_OVERRIDES, "roi_size": [crop] * 3}
    if "pretrain" in name:
        overrides["region_size"] = [32] * 3
    return overrides


# ------------------------------------------------------------------------------------------------------ machine
def machine(device: torch.device) -> dict:
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover - the bundles need MONAI anyway
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count(),
                    # what "fp32" means here: PyTorch's defaults (TF32 convolutions, full-fp32 matmuls) unless changed
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        info["gpu"] = None
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since :func:`reset_peak` (None on CPU: see ``process_max_rss_gib``)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def max_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss is in KiB on Linux


def flop_counter_check(device: torch.device) -> dict:
    """FlopCounterMode on a small convolution against the count by hand (forward + weight and input gradients)."""
    conv = torch.nn.Conv3d(2, 3, kernel_size=3, padding=1, bias=False).to(device)
    x = torch.rand(1, 2, 4, 4, 4, device=device, requires_grad=True)
    counted = count_step(lambda: conv(x).sum())["flops"]
    by_hand = 3 * 2 * (3 * 4 ** 3 * 2 * 3 ** 3)  # 3 products (forward, dW, dX) × 2 FLOPs × multiply-adds
    return {"counted": counted, "by_hand": by_hand, "equal": counted == by_hand}


# ------------------------------------------------------------------------------------------------------ training
def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_setting(parts: dict, device: torch.device, precision: str, warmup: int, steps: int) -> dict:
    """Train ``parts`` (:func:`training_parts`) for ``warmup`` + ``steps`` steps in ``precision``; the figures."""
    network, loss_fn = parts["network"], parts["loss"]
    image, targets = to_device(parts["image"], device), to_device(parts["targets"], device)
    dtype = PRECISIONS[precision]
    lr = float(parts["parser"]["learning_rate"]) if "learning_rate" in parts["parser"] else 1e-4
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def forward_loss() -> torch.Tensor:
        with autocast(device, dtype):
            return loss_fn(network(image), targets)

    skipped = [0]

    def update() -> None:
        """One optimizer step, skipped when a gradient is NaN/inf (as the bundles' ``NonFiniteLossGuard`` does): an
        unguarded step would turn every weight into NaN and every later loss with it. fp16: ``GradScaler`` skips."""
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped[0] += scaler.get_scale() < scale  # the scale drops exactly when the step was skipped
            return
        grads = [p.grad for p in network.parameters() if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):  # one sync
            optimizer.step()
        else:
            skipped[0] += 1

    reset_peak(device)
    # first warm-up step: counted (FlopCounterMode slows it down; it is not timed)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        cost = count_step(lambda: scaler.scale(forward_loss()))
    else:
        cost = count_step(forward_loss)
    update()
    losses = []
    times = []
    for i in range(max(warmup - 1, 0) + steps):
        sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = forward_loss()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        update()
        sync(device)
        if i >= max(warmup - 1, 0):
            times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
    s_per_step = statistics.median(times)
    return {
        "status": "ok",
        "s_per_step": s_per_step,
        "step_times_s": times,
        "volumes_per_s": parts["crops"] / s_per_step,
        "flops_per_step": cost["flops"],
        "achieved_tflops": cost["flops"] / s_per_step / 1e12,
        "peak_memory_gib": peak_memory_gib(device),
        "loss_finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
        "nonfinite_grad_steps": int(skipped[0]),  # of the warmup + steps updates, skipped for NaN/inf gradients
        "last_loss": losses[-1],
    }


# ------------------------------------------------------------------------------------------------------ inference
def sliding_window(name: str, overrides: dict, device: torch.device, volume: Sequence[int]) -> dict:
    """The finetuning bundle's ``validate#inferer`` on one random ``1×C×volume`` CT, under the bundle's AMP setting."""
    from hybridmim_components.workflow import amp_kwargs, config_flag

    parser = bundle_parser(name, overrides, missing_ok=True)
    inferer = parser.get_parsed_content("validate#inferer")
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def").to(device).eval()
    use_amp = config_flag(parser["amp"], "amp") and device.type == "cuda"
    kwargs = amp_kwargs(parser["amp_dtype"]) if use_amp else {}
    channels = int(parser["network_def#in_channels"])
    x = torch.rand((1, channels, *volume), device=device)
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, enabled=use_amp, **kwargs):
        out = inferer(x, network)
    sync(device)
    seconds = time.perf_counter() - start
    return {"status": "ok", "bundle": name, "volume": list(volume), "roi_size": list(map(int, inferer.roi_size)),
            "sw_batch_size": int(inferer.sw_batch_size), "overlap": _plain(inferer.overlap),
            "amp": f"autocast {kwargs.get('dtype', torch.float16)}".replace("torch.", "") if use_amp else "fp32",
            "output_shape": list(out.shape), "s": seconds, "volumes_per_s": 1.0 / seconds,
            "peak_memory_gib": peak_memory_gib(device), "output_finite": bool(torch.isfinite(out).all())}


def _plain(value):
    """A config value as JSON (a float, or a list of them: MONAI accepts one overlap per axis)."""
    return float(value) if isinstance(value, (int, float)) else [float(v) for v in value]


# ------------------------------------------------------------------------------------------------------ DDP start
def ddp_start(device: torch.device) -> dict:
    """A one-process process group (NCCL on CUDA, gloo on CPU), a DDP-wrapped conv, one step, one all-reduce."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120))
    try:
        init_s = time.perf_counter() - start
        net = torch.nn.Conv3d(1, 4, 3).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
        ddp(torch.rand(2, 1, 8, 8, 8, device=device)).mean().backward()
        total = torch.ones(1, device=device)
        dist.all_reduce(total)
        sync(device)
        return {"status": "ok", "backend": backend, "world_size": dist.get_world_size(), "init_s": init_s,
                "total_s": time.perf_counter() - start, "all_reduce": float(total),
                "grad_finite": bool(all(torch.isfinite(p.grad).all() for p in net.parameters()))}
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------ report
def _failed(exc: BaseException) -> dict:
    return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc(limit=6)[-3000:]}


def markdown(result: dict) -> str:
    m = result["machine"]
    where = m["gpu"] or f"CPU ({m['cpu']}, {m['cpu_count']} cores)"
    lines = [f"# GPU check: {where}", "",
             f"`{result['command']}`, {result['started']} UTC, torch {m['torch']}, MONAI {m.get('monai')}"
             + (f", CUDA {m['cuda']}, {m['gpu_memory_gib']} GiB" if m["gpu"] else "") + ".", ""]
    if m["gpu"]:
        lines += [f"fp32 = autocast off, PyTorch's TF32 settings: convolutions {m['tf32_cudnn']}, matmuls "
                  f"{m['tf32_matmul']}. fp16 with a GradScaler, bf16 without. The batch stays on the GPU (no loading).",
                  ""]
    if result["tiny"]:
        lines += [f"**Tiny settings** ({result['tiny_reason']}): widths and crops shrunk, the figures check the "
                  "command, they say nothing about the paper's settings.", ""]
    lines += ["## Training steps", "",
              "| bundle | crop | crops/step | precision | s/step | volumes/s | peak memory (GiB) | TFLOP/step | "
              "achieved TFLOP/s | steps skipped (NaN/inf gradients) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in result["training"]:
        crop = "×".join(map(str, t["settings"]["roi_size"]))
        if t["status"] != "ok":
            lines.append(f"| {t['bundle']} | {crop} | {t['settings']['crops_per_step']} | {t['precision']} | "
                         f"{t['status']}: {t.get('error', '')[:80]} | | | | | |")
            continue
        mem = "n/a (CPU)" if t["peak_memory_gib"] is None else f"{t['peak_memory_gib']:.1f}"
        lines.append(f"| {t['bundle']} | {crop} | {t['settings']['crops_per_step']} | {t['precision']} | "
                     f"{t['s_per_step']:.3f} | {t['volumes_per_s']:.2f} | {mem} | {t['flops_per_step'] / 1e12:.3g} | "
                     f"{t['achieved_tflops']:.3g} | {t.get('nonfinite_grad_steps', 0)} |")
    lines += ["", "## Sliding-window inference", "",
              "| bundle | volume | roi, sw_batch, overlap | precision | s | peak memory (GiB) |", "|---|---|---|---|---|---|"]
    for s in result["inference"]:
        if s["status"] != "ok":
            lines.append(f"| {s['bundle']} | | | | {s['status']}: {s.get('error', '')[:80]} | |")
            continue
        mem = "n/a (CPU)" if s["peak_memory_gib"] is None else f"{s['peak_memory_gib']:.1f}"
        lines.append(f"| {s['bundle']} | {'×'.join(map(str, s['volume']))} | {'×'.join(map(str, s['roi_size']))}, "
                     f"{s['sw_batch_size']}, {s['overlap']} | {s['amp']} | {s['s']:.2f} | {mem} |")
    d = result["ddp"]
    lines += ["", "## DDP start", "",
              (f"{d['backend']}, world size {d['world_size']}: process group in {d['init_s']:.2f} s, first DDP step and "
               f"all-reduce done {d['total_s']:.2f} s after the start." if d.get("status") == "ok"
               else f"{d.get('status', 'not run yet')}: {d.get('error', '')}"),
              "", f"FLOP counter check (a 3×3×3 convolution): counted {result['flop_counter_check']['counted']}, "
              f"by hand {result['flop_counter_check']['by_hand']}. Total {result['elapsed_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def write(result: dict, output_dir: str) -> tuple[str, str]:
    os.makedirs(output_dir, exist_ok=True)
    stem = os.path.join(output_dir, f"gpu_check_{'cuda' if result['machine']['gpu'] else 'cpu'}"
                        + ("_tiny" if result["tiny"] else ""))
    with atomic_open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with atomic_open(stem + ".md", "w") as f:
        f.write(markdown(result))
    return stem + ".json", stem + ".md"


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny widths and crops (automatic without CUDA)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps, the first counted (default 2; tiny 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; tiny 1)")
    ap.add_argument("--no-inference", action="store_true", help="skip the sliding-window inference")
    ap.add_argument("--time-budget", type=float, default=420.0,
                    help="seconds after which the remaining settings are skipped (the lease is short)")
    ap.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR)
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    tiny = args.tiny or device.type != "cuda"
    reason = "--tiny" if args.tiny else ("no CUDA device: tiny settings chosen automatically" if tiny else "")
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    steps = args.steps if args.steps is not None else (1 if tiny else 5)
    if warmup < 1 or steps < 1:
        ap.error(f"--warmup and --steps must be at least 1 (got {warmup}, {steps}): the first warm-up step is counted")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"gpu_check on {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + (f": TINY settings ({reason})" if tiny else ": the bundles' default (paper) settings"), flush=True)

    import shlex

    t0 = time.perf_counter()
    result = {"command": shlex.join(["python", "tools/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "device": str(device), "machine": machine(device), "tiny": tiny, "tiny_reason": reason,
              "warmup_steps": warmup, "timed_steps": steps, "precisions": args.precisions,
              "flop_counter_check": flop_counter_check(device), "training": [], "inference": [], "ddp": {},
              "elapsed_s": 0.0}

    def over_budget() -> bool:
        return time.perf_counter() - t0 > args.time_budget

    def checkpoint() -> None:
        result["elapsed_s"] = time.perf_counter() - t0
        result["process_max_rss_gib"] = max_rss_gib()
        write(result, args.output_dir)

    bundles = [(family, name) for family in args.families for name in FAMILIES[family]]
    for family, name in bundles:
        overrides = tiny_overrides(name) if tiny else {}
        try:
            parts = training_parts(name, overrides)
            parts["network"].to(device)
            # every precision starts from the same weights (the rows are comparable, and one cannot poison the next)
            initial_state = {k: v.detach().to("cpu", copy=True) for k, v in parts["network"].state_dict().items()}
        except Exception as exc:  # noqa: BLE001 - recorded, the other bundles still run
            result["training"].append({"family": family, "bundle": name, "precision": "all", "settings": {
                "roi_size": [], "crops_per_step": 0}, **_failed(exc)})
            continue
        for precision in args.precisions:
            row = {"family": family, "bundle": name, "precision": precision, "settings": parts["settings"],
                   "overrides": overrides}
            if over_budget():
                row.update(status="skipped", error=f"time budget {args.time_budget:.0f} s spent")
            else:
                try:
                    parts["network"].load_state_dict(initial_state)
                    row.update(train_setting(parts, device, precision, warmup, steps))
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory: recorded, the run goes on
                    row.update(_failed(exc))
            result["training"].append(row)
            if row["status"] == "ok":
                print(f"{name} {precision}: {row['s_per_step']:.3f} s/step, {row['volumes_per_s']:.2f} volumes/s, "
                      f"{row['achieved_tflops']:.2f} TFLOP/s, peak {row['peak_memory_gib']} GiB"
                      + (f", {row['nonfinite_grad_steps']} step(s) skipped for NaN/inf gradients"
                         if row["nonfinite_grad_steps"] else ""), flush=True)
            else:
                print(f"{name} {precision}: {row['status']} {row.get('error', '')}", flush=True)
            checkpoint()
        del parts
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if not args.no_inference:
        for family in args.families:
            if not family.endswith("finetune"):
                continue
            for name in FAMILIES[family]:
                if over_budget():
                    row = {"bundle": name, "status": "skipped", "error": f"time budget {args.time_budget:.0f} s spent"}
                else:
                    try:
                        row = sliding_window(name, tiny_overrides(name) if tiny else {}, device,
                                             TINY_VOLUME if tiny else CT_VOLUME)
                    except Exception as exc:  # noqa: BLE001
                        row = {"bundle": name, **_failed(exc)}
                result["inference"].append(row)
                print(f"{name} sliding window: {row['status']} " + (f"{row['s']:.2f} s" if row["status"] == "ok"
                                                                  else row.get("error", "")), flush=True)
                checkpoint()

    try:
        result["ddp"] = ddp_start(device)
    except Exception as exc:  # noqa: BLE001
        result["ddp"] = _failed(exc)
    print(f"DDP start: {result['ddp']['status']} {result['ddp'].get('backend', result['ddp'].get('error', ''))}")
    checkpoint()
    json_path, md_path = write(result, args.output_dir)
    print(f"wrote {json_path} and {md_path} ({result['elapsed_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
