"""tools/bundles/verify_bundles.py: the model zoo's CI checks (`ci/verify_bundle.py -m full`) on every bundle.

The full run (all twelve bundles, all checks, tiny widths, one process) is slow-marked; fast tests cover the
pretraining bundles' data-shape check (their networks used to return a dict), the torchscript exemptions, and a
deliberately broken bundle copy being reported as a failure that names the bundle and the check.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from tools.bundles import verify_bundles as vb

BUNDLES = vb.list_bundles(vb.BUNDLES_DIR)


def test_twelve_bundles_found():
    assert len(BUNDLES) == 12, BUNDLES


@pytest.mark.slow
def test_every_bundle_passes_every_check(tmp_path):
    results = vb.verify_bundles(workdir=str(tmp_path))
    table = vb.format_table(results)
    assert {(r.bundle, r.check) for r in results} == {(b, c) for b in BUNDLES for c in vb.CHECKS}, table
    for r in results:
        if r.check == "torchscript" and r.bundle in vb.EXCLUDE_VERIFY_TORCHSCRIPT:
            assert r.status == "skipped" and "SwinUNETR" in r.detail, table
        else:
            assert r.status == "pass", table


# the UNet ones take ~1 s; the SwinUNETR ones (~10 s each on CPU) run in the slow full check above
@pytest.mark.parametrize("name", ["hybridmim_unet_pretrain", "hybridmim_unet_pretrain_brats"])
def test_pretrain_inference_network_matches_metadata(name, tmp_path):
    """The zoo's verify_net_in_out on configs/inference.json: one tensor with the metadata's channels and dtype
    (the pretraining network returns a dict, so its inference network_def is the region-reconstruction backbone)."""
    results = vb.verify_bundles([name], checks=("net_in_out",), workdir=str(tmp_path))
    assert [(r.check, r.status) for r in results] == [("net_in_out", "pass")], vb.format_table(results)


def test_torchscript_exemptions_are_exactly_the_swin_bundles():
    """Mirrors the zoo's exclude_verify_torchscript_list: skipped exactly where the inference network is a
    SwinUNETR (not scriptable), nowhere else."""
    swin = set()
    for name in BUNDLES:
        with open(os.path.join(vb.BUNDLES_DIR, name, "configs", "inference.json"), encoding="utf-8") as f:
            if "SwinUNETR" in json.load(f)["network_def"]["_target_"]:
                swin.add(name)
    assert swin == set(vb.EXCLUDE_VERIFY_TORCHSCRIPT) and len(swin) == 6
    assert not vb.EXCLUDE_VERIFY_SHAPE


def test_broken_bundle_is_reported(tmp_path, capsys):
    """Metadata promising 3 output channels for a 2-class bundle: net_in_out fails, named with the bundle; the
    untouched check still passes; the command exits 1."""
    name = "hybridmim_unet_msd_spleen"
    bundles_dir = tmp_path / "bundles"
    shutil.copytree(os.path.join(vb.BUNDLES_DIR, name), bundles_dir / name)
    meta_file = bundles_dir / name / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 2
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 3
    meta_file.write_text(json.dumps(meta))

    code = vb.main(["--bundles_dir", str(bundles_dir), "--bundles", name, "--checks", "version", "net_in_out"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert logging.root.manager.disable == logging.NOTSET  # main() restored logging
    row = next(line for line in out.splitlines() if line.startswith(name))
    assert row.split()[1:3] == ["pass", "FAIL"], out  # version passes, net_in_out fails
    note = next(line for line in out.splitlines() if line.startswith("[1]"))
    assert "net_in_out fail" in note and name in note and "channel" in note and "3" in note, out


def test_broken_torchscript_is_reported(tmp_path):
    """A train.json whose best-model saver writes a file inference cannot load (a renamed key) fails torchscript."""
    name = "hybridmim_unet_btcv"
    bundles_dir = tmp_path / "bundles"
    shutil.copytree(os.path.join(vb.BUNDLES_DIR, name), bundles_dir / name)
    train_file = bundles_dir / name / "configs" / "train.json"
    train = json.loads(train_file.read_text())
    saver = next(h for h in train["validate"]["handlers"] if h.get("key_metric_filename") == "model.pt")
    saver["save_dict"] = {"model": "$torch.nn.Sequential(@network)"}  # keys gain a "0." prefix
    train_file.write_text(json.dumps(train))

    results = vb.verify_bundles([name], bundles_dir=str(bundles_dir), checks=("torchscript",), workdir=str(tmp_path))
    assert [(r.bundle, r.check, r.status) for r in results] == [(name, "torchscript", "fail")]
    assert "Missing key" in results[0].detail or "Unexpected key" in results[0].detail, results[0].detail


def test_metadata_schema_ships_with_the_repository(tmp_path):
    """The schema lives inside the repository (a fresh clone validates metadata offline; nothing skips without a
    ../shared beside it), its bytes are the published file's, its origin and licence are noted beside it, and every
    bundle's metadata names it and validates against it."""
    import hashlib

    from monai.bundle import verify_metadata

    schema = os.path.realpath(vb.DEFAULT_SCHEMA)
    assert schema.startswith(os.path.realpath(vb.REPO_ROOT) + os.sep), schema
    with open(schema, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == vb.SCHEMA_SHA256
    with open(os.path.join(os.path.dirname(schema), "README.md"), encoding="utf-8") as f:
        notice = f.read()
    assert "Apache License 2.0" in notice and "MONAI-extra-test-data" in notice and vb.SCHEMA_SHA256 in notice
    copy = tmp_path / "schema.json"  # verify_metadata may write beside the schema: never into the repository
    shutil.copy(schema, copy)
    for name in BUNDLES:
        meta = os.path.join(vb.BUNDLES_DIR, name, "configs", "metadata.json")
        with open(meta, encoding="utf-8") as f:
            assert json.load(f)["schema"].endswith("/" + os.path.basename(schema)), name
        verify_metadata(meta_file=meta, filepath=str(copy))


def test_missing_schema_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        vb.main(["--schema", str(tmp_path / "nope.json"), "--bundles", BUNDLES[0]])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nope.json" in err and "--schema PATH" in err
