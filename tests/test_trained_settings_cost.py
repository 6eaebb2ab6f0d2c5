"""tools/experiments/trained_settings_cost.py: what it needs before running, and the table it writes (the runs
themselves need a finished ``tools/demo.py``; their figures are in docs/experiments/trained_settings_cost.md)."""
from __future__ import annotations

import pytest

from tools.experiments import trained_settings_cost as cost


def test_without_a_finished_demo_it_says_which_command_to_run_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="python tools/demo.py --out_dir"):
        cost.measure(str(tmp_path / "no_demo"), str(tmp_path / "data"))


def test_the_table_shows_each_setting_with_its_dice_or_the_stop():
    result = {"task": "spleen", "arm": "pretrained", "case": "ct.nii.gz", "rows": [
        {"setting": "trained", "pixdim": [3.0, 3.0, 3.0], "dice": 0.4371},
        {"setting": "default spacing, check off", "pixdim": [1.5, 1.5, 2.0], "dice": 0.1},
        {"setting": "default spacing, checked", "pixdim": [1.5, 1.5, 2.0], "dice": None,
         "stopped": ["spacing: trained with [3.0, 3.0, 3.0], this config has [1.5, 1.5, 2.0]"]}]}
    text = cost.markdown(result)
    assert "| trained | [3.0, 3.0, 3.0] | 0.437 |" in text
    assert "| default spacing, check off | [1.5, 1.5, 2.0] | 0.100 |" in text
    assert "stopped: spacing: trained with [3.0, 3.0, 3.0]" in text
