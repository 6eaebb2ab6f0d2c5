"""Boolean keys given on the command line as strings (``--amp false``) mean false in every bundle.

python-fire hands ``--amp false`` to the bundle as the string ``'false'``, which Python treats as true: without
``config_flag`` a user asking for fp32, no resume or no saved predictions got the opposite.
"""
from __future__ import annotations

import glob
import json
import os

import pytest
from monai.bundle import ConfigParser

from hybridmim_components.workflow import config_flag

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ("amp", "resume", "save_predictions")


def test_config_flag_parses_cli_strings_and_refuses_others():
    for value, expected in [(True, True), (False, False), ("false", False), ("False", False), ("true", True),
                            ("1", True), ("0", False), ("no", False), (" yes ", True), (1, True), (0, False)]:
        assert config_flag(value, "amp") is expected, value
    for bad in ("fasle", "", 2, None, 0.5):
        with pytest.raises(ValueError, match="amp must be true or false"):
            config_flag(bad, "amp")


def _flag_items(config, path=""):
    """Ids of config items that read a flag directly (a plain reference or an expression around it)."""
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list):
        items = enumerate(config)
    else:
        return
    for key, value in items:
        item_id = f"{path}#{key}" if path else str(key)
        if isinstance(value, str) and any(f"@{flag}" in value for flag in FLAGS) and key in ("amp", "enabled",
                                                                                             "_disabled_"):
            yield item_id, value
        else:
            yield from _flag_items(value, item_id)


CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "bundles", "*", "configs", "*.json")))


@pytest.mark.parametrize("config_file", CONFIGS, ids=[os.path.relpath(c, REPO_ROOT) for c in CONFIGS])
def test_string_false_flags_evaluate_false(config_file):
    with open(config_file, encoding="utf-8") as f:
        content = json.load(f)
    items = list(_flag_items(content))
    for item_id, raw in items:
        parser = ConfigParser()
        configs = [config_file]
        if os.path.basename(config_file) == "evaluate.json":
            configs.insert(0, os.path.join(os.path.dirname(config_file), "train.json"))
        parser.read_config(configs)
        parser.update({flag: "false" for flag in FLAGS})
        value = parser.get_parsed_content(item_id)
        wanted = not item_id.endswith("_disabled_")  # "_disabled_" must become true when its flag is false
        assert bool(value) is (not wanted), f"{item_id} = {raw!r} gives {value!r} for flags given as 'false'"
