"""tools/benchmarks/benchmark_pretrain_step.py at tiny sizes: the staged (profiled) step computes what the plain step computes,
and the loader / inference / JSON parts have the promised shapes and keys. No timing is asserted."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from hybridmim_components import HybridMIMLoss, HybridMIMSwinUNETR, HybridMIMUNet
from tools.benchmarks import benchmark_pretrain_step as bench
from tools.bundles.bundlegen.figures import step_time_table

TINY_UNET = ["--features", "4", "4", "8", "8", "16", "4"]


def _net(backbone: str, views: str):
    if backbone == "swin":
        return HybridMIMSwinUNETR(1, feature_size=12, region_size=32, contrastive_views=views), 64
    return HybridMIMUNet(1, features=(4, 4, 8, 8, 16, 4), dropout=0.2, region_size=16, contrastive_views=views), 32


@pytest.mark.parametrize("backbone, views", [("unet", "two_sided"), ("unet", "one_sided"), ("unet", "none"),
                                             pytest.param("swin", "two_sided", marks=pytest.mark.slow)])
def test_staged_step_gives_the_loss_and_gradients_of_the_plain_step(backbone, views):
    torch.manual_seed(0)
    net, crop = _net(backbone, views)
    twin = copy.deepcopy(net)
    batch = bench.make_batch(2, 1, crop, torch.device("cpu"))
    loss_fn = HybridMIMLoss()
    cpu = torch.device("cpu")

    torch.manual_seed(1)  # same dropout draws in both steps
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    optimizer.zero_grad()
    plain_loss = loss_fn(net(batch["image"]), batch)
    plain_loss.backward()

    torch.manual_seed(1)
    staged_loss, times = bench.staged_step(twin, loss_fn, torch.optim.SGD(twin.parameters(), lr=0.0), batch, cpu)

    assert set(times) == set(bench.STAGES) and all(t >= 0 for t in times.values())
    assert (times["second view (no grad)"] > 0) == (views == "one_sided")
    torch.testing.assert_close(staged_loss, plain_loss.detach(), rtol=1e-6, atol=1e-7)
    grads = {n: p.grad for n, p in net.named_parameters()}
    # absolute tolerance on the scale of the step's gradients: a convolution bias followed by instance norm has a
    # gradient of exactly zero in exact arithmetic, so the two steps' values there are float32 rounding (up to 1e-7
    # on an AMD EPYC, where a fixed 1e-7 failed); a staging error would differ by the order of the gradients (~1)
    scale = max(g.abs().max().item() for g in grads.values() if g is not None)
    with_grad = 0
    for name, p in twin.named_parameters():
        if grads[name] is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        with_grad += 1
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
    assert with_grad > 10  # the decoder, the heads and the encoder all got gradients


def test_loader_measure_runs_the_bundle_pipeline_at_tiny_size():
    out = bench.measure_loader(workers=0, batches=2, roi=32, pool_volumes=2, pool_shape=(48, 48, 40))
    cfg = json.load(open(f"{bench.BUNDLES_DIR}/hybridmim_unet_pretrain/configs/train.json", encoding="utf-8"))
    crops = cfg["batch_size"] * cfg["samples_per_volume"]
    assert out["batch_shape"] == [crops, 1, 32, 32, 32]
    assert out["num_workers"] == 0 and out["volumes"] == 2 and out["batches"] == 2
    assert out["crops_per_second"] > 0 and out["cache_volumes_per_second"] > 0
    assert out["datalist"].startswith("generated CT pool, 2 volumes of 48x48x40")


def test_inference_measure_counts_the_windows_and_returns_the_full_volume():
    rows = bench.measure_inference(volume=(64, 48, 32), roi=32, overlap=0.5, width=[4, 4, 8, 8, 16, 4])
    (row,) = rows
    # windows every 16 voxels: (64-32)/16+1 = 3, (48-32)/16+1 = 2, 1 along the last axis
    assert row["windows"] == 3 * 2 * 1
    assert row["output_shape"] == [1, 14, 64, 48, 32]  # BTCV: 14 classes, the whole volume
    assert row["precision"] == "fp32" and row["sw_batch_size"] == 4 and row["peak_memory_gib"] is None


def test_benchmark_json_states_the_device_and_keeps_the_figures_keys(tmp_path):
    out = tmp_path / "result.json"
    result = bench.main(["--backbones", "unet", "--crop", "32", "--region", "16", "--batch", "2", "--steps", "1",
                         *TINY_UNET, "--views", "two_sided", "one_sided", "--profile", "--device", "cpu",
                         "--output", str(out)])
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["device"].startswith("CPU") and saved["amp"] is False and saved["precisions"] == ["fp32"]
    assert saved["amp_note"] == "CPU: AMP not measured"
    assert [(s["views"], s["region"]) for s in saved["settings"]] == [
        ("two_sided", 16), ("two_sided", 32), ("one_sided", 16), ("one_sided", 32)]
    assert all(set(s["stage_seconds"]) == set(bench.STAGES) for s in saved["settings"])
    assert [r["views"] for r in saved["ratios"]] == ["two_sided", "one_sided"]
    assert {r["region"] for r in saved["two_sided_over_one_sided"]} == {16, 32}
    assert saved["max_rss_gib"]["after_steps"] > 0
    table = step_time_table(saved)  # the README figures still read it
    assert "| unet | two_sided | 16³ |" in table and "(full)" in table
    assert result["settings"][0]["seconds_per_step"] == saved["settings"][0]["seconds_per_step"]


def test_benchmark_refuses_amp_without_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench.main(["--backbones", "unet", "--crop", "32", "--region", "16", "--batch", "2", "--steps", "1",
                    *TINY_UNET, "--device", "cpu", "--precisions", "amp"])
