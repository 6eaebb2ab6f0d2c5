"""An earlier release keeps working: what commit 432d705 shipped runs with today's package.

Fixtures in ``tests/data/compat_432d705/`` (made from that commit by its ``make_fixtures.sh``): the list of
``hybridmim_components`` names its twelve bundles reference, a packed and trained ``hybridmim_unet_msd_spleen`` zip,
and a full training checkpoint of the same run (written before checkpoints held random states).

- Every old name resolves through MONAI's ``ConfigParser`` (``_target_``, ``$`` expressions, ``$import``) to today's
  object; a moved one warns naming its old and new path, one that still exists does not warn.
- slow: the zip downloaded with ``monai.bundle download`` runs its ``inference.json`` with today's package.
- slow: the checkpoint resumes with today's bundle from its stored iteration, saying that the resume is not exact.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import pydoc
import re
import shutil
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from hybridmim_components import moved

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "data", "compat_432d705")
BUNDLE = "hybridmim_unet_msd_spleen"
BUNDLE_ZIP = os.path.join(FIXTURES, f"{BUNDLE}_432d705.zip")
OLD_CHECKPOINT = os.path.join(FIXTURES, "checkpoint_epoch=1.pt")
# the settings make_fixtures.sh trained with (a packed 0.1.0 bundle's configs still hold the repository defaults)
TRAINED = {"features": [2, 2, 4, 4, 8, 2], "roi_size": [32, 32, 32], "amp": False}


def _old_names() -> list[str]:
    with open(os.path.join(FIXTURES, "referenced_names.txt"), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


OLD_NAMES = _old_names()


def _moved_module_paths() -> list[str]:
    """Every old path of every moved module: the module itself and each public name (``__all__``) it holds now."""
    paths = []
    for old, new in sorted(moved.MOVED_MODULES.items()):
        names = getattr(importlib.import_module(new), "__all__", None)
        assert names, f"{new} has no __all__: its old paths cannot be listed"
        paths += [old, *(f"{old}.{name}" for name in names)]
    return paths


# the 0.1.0 fixture's names are checked by the test above these; these are the rest (0.2.0's moves: weights, utils)
MOVED_MODULE_PATHS = [path for path in _moved_module_paths() if path not in set(OLD_NAMES)]


def _forget_old_names() -> None:
    """Drop old module names an earlier use imported, so that the next use imports (and warns) again."""
    for old in moved.MOVED_MODULES:
        sys.modules.pop(old, None)
        parent, _, child = old.rpartition(".")
        if parent in sys.modules:
            vars(sys.modules[parent]).pop(child, None)


def _is_module(path: str) -> bool:
    return isinstance(pydoc.locate(path), types.ModuleType)


def _config_forms(name: str, is_module: bool) -> dict[str, dict]:
    """The ways a bundle config can name ``name``, each a config whose ``x`` is the named object."""
    forms = {"expression": {"imports": ["$import hybridmim_components"], "x": f"${name}"}}
    if is_module:
        # as the old bundles import (MONAI binds `import a.b` to the name "a.b", so "a" is imported on its own too)
        forms["import"] = {"imports": ["$import hybridmim_components", f"$import {name}"], "x": f"${name}"}
    else:
        module, _, attr = name.rpartition(".")
        forms["target"] = {"x": {"_target_": name, "_mode_": "callable"}}
        forms["from-import"] = {"imports": [f"$from {module} import {attr}"], "x": f"${attr}"}
    return forms


def test_the_fixture_lists_the_old_bundles_names():
    # what make_fixtures.sh extracted: the release's own targets (moved ones and ones that stayed)
    assert len(OLD_NAMES) == len(set(OLD_NAMES)) > 30
    assert "hybridmim_components.data.load_datalist" in OLD_NAMES
    assert "hybridmim_components.HybridMIMLoss" in OLD_NAMES


def _resolves_through_config_parser(name: str) -> None:
    """``name`` in every form a config can use (``_target_``, ``$`` expression, ``$import``, ``$from ... import``)
    is today's object; a moved one warns naming its old and new path, one that still exists does not warn."""
    from monai.bundle import ConfigParser

    new = moved.new_path(name)
    _forget_old_names()
    with warnings.catch_warnings():
        warnings.simplefilter("error", moved.HybridMIMDeprecationWarning)  # today's path resolves without the tables
        expected = pydoc.locate(new or name)
    assert expected is not None, f"{name} -> {new}: the new path does not resolve"
    for form, config in _config_forms(name, _is_module(new or name)).items():
        _forget_old_names()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = ConfigParser(config).get_parsed_content("x")
        assert value is expected, f"{name} ({form}): {value!r} is not {expected!r}"
        ours = [str(w.message) for w in caught if issubclass(w.category, moved.HybridMIMDeprecationWarning)]
        if new is None:
            assert not ours, f"{name} still exists and must not warn ({form}): {ours}"
            continue
        assert ours, f"{name} ({form}) moved to {new} but no HybridMIMDeprecationWarning was raised"
        # the warning names a prefix of the old name and where that prefix is now
        found = re.search(r"^deprecated: '([\w.]+)' moved to '([\w.]+)'", ours[0])
        assert found, ours[0]
        old_part, new_part = found.groups()
        assert name == old_part or name.startswith(old_part + "."), (name, ours[0])
        assert new == new_part + name[len(old_part):], (name, new, ours[0])


@pytest.mark.parametrize("name", OLD_NAMES)
def test_old_name_resolves_through_config_parser(name):
    _resolves_through_config_parser(name)


def test_moved_module_paths_cover_the_weights_and_utils_moves():
    # what the 0.2.0 bundles named before the move (their configs, as generated then)
    for old in ("hybridmim_components.provenance.ProvenanceRecorder", "hybridmim_components.provenance.make_record",
                "hybridmim_components.distributed", "hybridmim_components.distributed.shutdown_process_group",
                "hybridmim_components.transfer.load_pretrained_weights", "hybridmim_components.merging",
                "hybridmim_components.trained_settings.check_trained_settings",
                "hybridmim_components.public_weights.convert_checkpoint",
                "hybridmim_components.atomic_files.atomic_open"):
        assert old in MOVED_MODULE_PATHS, old
        assert moved.new_path(old).startswith(("hybridmim_components.weights.", "hybridmim_components.utils.")), old


@pytest.mark.parametrize("name", MOVED_MODULE_PATHS)
def test_every_old_path_of_a_moved_module_resolves_through_config_parser(name):
    _resolves_through_config_parser(name)


@pytest.mark.parametrize("old", sorted(moved.MOVED_MODULES))
def test_import_statements_of_an_old_module_give_the_new_one(old):
    # plain Python, as a script or a bundle's own component written against the old layout imports
    new = importlib.import_module(moved.MOVED_MODULES[old])
    name = new.__all__[0]
    cases = [(f"import {old}", old, new), (f"import {old} as m", "m", new),
             (f"from {old} import {name} as n", "n", getattr(new, name))]
    for statement, expression, expected in cases:
        _forget_old_names()
        namespace: dict = {}
        with pytest.warns(moved.HybridMIMDeprecationWarning,
                          match=rf"^deprecated: '{re.escape(old)}' moved to '{re.escape(new.__name__)}'"):
            exec(statement, namespace)  # noqa: S102 (the statement under test)
        assert eval(expression, namespace) is expected, statement  # noqa: S307


def test_import_statement_gets_the_new_module():
    _forget_old_names()
    with pytest.warns(moved.HybridMIMDeprecationWarning,
                      match=r"'hybridmim_components\.data' moved to 'hybridmim_components\.workflow\.data'"):
        import hybridmim_components.data as old_module
    from hybridmim_components.workflow import data as new_module

    assert old_module is new_module


def test_checkpoint_without_random_states_resumes_with_a_warning(tmp_path, caplog):
    # the rule of the slow CLI test below on a bare ignite engine: the old checkpoint's entries load, the random
    # states are reported missing (not an error)
    import logging

    from ignite.engine import Engine

    from hybridmim_components.workflow import RandomStates, ResumeFromLatestCheckpoint

    def engine() -> Engine:
        return Engine(lambda e, batch: None)

    old = engine()
    old.run([0, 1, 2], max_epochs=1)
    torch.save({"trainer": old.state_dict()}, tmp_path / "checkpoint_epoch=1.pt")  # as 0.1.0 wrote it
    trainer = engine()
    states = RandomStates(trainer)
    states.attach(trainer)
    with caplog.at_level(logging.WARNING):
        ResumeFromLatestCheckpoint(str(tmp_path), {"trainer": trainer, "random_states": states}).attach(trainer)
        trainer.run([0, 1, 2], max_epochs=2)
    assert trainer.state.iteration == 6 and trainer.state.epoch == 2  # continued at iteration 3
    assert any("holds no random states" in r.getMessage() and "not exact" in r.getMessage() for r in caplog.records)
    assert states.state_dict()["iteration"] == 6  # and records them for the next checkpoint


def test_a_name_renamed_inside_a_moved_module(monkeypatch):
    # the table's other kind of entry, as the next moves will need it: old module path + old name -> new name
    from monai.bundle import ConfigParser

    from hybridmim_components.workflow import progress

    old, new = "hybridmim_components.progress.old_loss_of", "hybridmim_components.workflow.progress.loss_of"
    monkeypatch.setitem(moved.MOVED_NAMES, old, new)
    monkeypatch.setattr(progress, "__getattr__", lambda name: moved.moved_attribute(progress.__name__, name),
                        raising=False)
    assert moved.new_path(old) == new
    _forget_old_names()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = ConfigParser({"x": {"_target_": old, "_mode_": "callable"}}).get_parsed_content("x")
    assert value is progress.loss_of
    messages = [str(w.message) for w in caught if issubclass(w.category, moved.HybridMIMDeprecationWarning)]
    assert any(f"'{old}' moved to '{new}'" in m for m in messages), messages


def test_moved_warning_is_visible_by_default():
    # a FutureWarning: shown without -W flags even when raised inside MONAI's code (DeprecationWarning is not)
    assert issubclass(moved.HybridMIMDeprecationWarning, FutureWarning)


@pytest.mark.parametrize("old", sorted(moved.MOVED_MODULES))
def test_moved_module_entries_are_really_gone(old):
    # an entry must never shadow or alias something that still exists
    parent, _, child = old.rpartition(".")
    package = importlib.import_module(parent)
    assert importlib.machinery.PathFinder.find_spec(old, package.__path__) is None, f"{old} still exists"
    assert child not in vars(package) or vars(package)[child] is sys.modules.get(old)
    assert importlib.util.find_spec(moved.MOVED_MODULES[old]) is not None


@pytest.mark.parametrize("old", sorted(moved.MOVED_NAMES))
def test_moved_name_entries_are_really_gone(old):
    module, _, attr = old.rpartition(".")
    assert attr not in vars(importlib.import_module(module)), f"{old} still exists"
    assert pydoc.locate(moved.MOVED_NAMES[old]) is not None


def test_unknown_attribute_still_raises_attribute_error():
    import hybridmim_components

    with pytest.raises(AttributeError, match="no_such_name"):
        hybridmim_components.no_such_name  # noqa: B018


# ----------------------------------------------------------------------------------------------- CLI runs (slow)
def _run(args: list[str], cwd: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"monai.bundle {args[0]} failed (exit {proc.returncode}):\n{text[-6000:]}"
    return text


def _cli(overrides: dict) -> list[str]:
    return [arg for k, v in overrides.items() for arg in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]


def _tiny_ct(path: str, shape=(36, 34, 30)) -> np.ndarray:
    """A small CT-like volume (HU, int16): air around a box of soft tissue holding a denser blob."""
    import nibabel as nib

    ct = np.full(shape, -1000, dtype=np.int16)
    ct[4:-4, 4:-4, 3:-3] = 40
    ct[12:22, 10:20, 8:18] = 130
    nib.save(nib.Nifti1Image(ct, np.diag([1.5, 1.5, 2.0, 1.0])), path)
    return ct


@pytest.mark.slow
def test_packed_bundle_downloads_and_infers(tmp_path):
    import nibabel as nib

    _run(["download", "--name", BUNDLE, "--url", f"file://{BUNDLE_ZIP}", "--bundle_dir", str(tmp_path)],
         cwd=str(tmp_path))
    bundle = tmp_path / BUNDLE
    assert (bundle / "models" / "model.pt").is_file()
    data = tmp_path / "data"
    data.mkdir()
    image = _tiny_ct(str(data / "case.nii.gz"))
    (data / "datalist.json").write_text(json.dumps({"testing": [{"image": "case.nii.gz"}]}))
    text = _run(["run", "--config_file", str(bundle / "configs" / "inference.json"),
                 *_cli({"bundle_root": str(bundle), "dataset_dir": str(data), "data_list_file_path": "datalist.json",
                        "dataloader#num_workers": 0, **TRAINED})], cwd=str(tmp_path))
    # the old configs' imports went through the aliases, loudly
    assert "deprecated: 'hybridmim_components.data' moved to 'hybridmim_components.workflow.data'" in text
    seg = nib.load(str(bundle / "eval" / "case_seg.nii.gz")).get_fdata()
    assert seg.shape == image.shape
    assert set(np.unique(seg)) <= {0.0, 1.0}


@pytest.mark.slow
def test_old_checkpoint_resumes_with_todays_bundle(tmp_path):
    from tools.data.make_demo_data import make_ct_dataset

    old = torch.load(OLD_CHECKPOINT, map_location="cpu", weights_only=True)
    assert "random_states" not in old
    stored = int(old["trainer"]["iteration"])
    datalist = make_ct_dataset(str(tmp_path / "data"), num_classes=2, n_train=1, n_val=1, n_test=1,
                               shape=(40, 40, 32))
    models = tmp_path / "bundle" / "models"
    models.mkdir(parents=True)
    shutil.copy(OLD_CHECKPOINT, models / os.path.basename(OLD_CHECKPOINT))
    overrides = {
        "bundle_root": str(tmp_path / "bundle"), "dataset_dir": os.path.dirname(datalist),
        "data_list_file_path": os.path.basename(datalist), "pretrained_path": "", "num_samples": 1, "cache_rate": 0,
        "train#dataloader#num_workers": 0, "val_interval": 1, "resume": True,
        "train#trainer#max_epochs": int(old["trainer"]["max_epochs"]) + 1, **TRAINED,
    }
    text = _run(["run", "--config_file", os.path.join(REPO_ROOT, "bundles", BUNDLE, "configs", "train.json"),
                 *_cli(overrides)], cwd=REPO_ROOT)
    assert f"(iteration {stored})" in text, text[-4000:]
    assert re.search(r"WARNING.*holds no random states.*not exact", text), text[-4000:]
    new = torch.load(models / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    epoch_length = int(old["trainer"]["epoch_length"])
    assert int(new["trainer"]["iteration"]) == stored + epoch_length  # continued, not restarted
    assert new["random_states"]  # today's checkpoint holds them again
