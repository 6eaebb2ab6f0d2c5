"""What a weights file is, and who says so: a published file's known digest, its keys, or only its shapes (a guess).

A file of the model zoo's ``swin_unetr_btcv_segmentation`` key layout and shapes (width 48, 1 channel, 14 outputs)
is also what our own ``hybridmim_swin_btcv`` finetune saves. The file here is a random network of that layout (no
download); its digest is not the published one, so shapes alone decide: a guess.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil

import pytest
import torch
from monai.networks.nets import SwinUNETR
from test_public_weights import FS, dae_file, swin_state, tang_swinvit_file

from hybridmim_components import LegacyPatchMerging, PretrainedWeightsError, load_pretrained_weights
from hybridmim_components.weights import public_weights
from hybridmim_components.weights.provenance import make_record, provenance_path, read_provenance, write_provenance
from hybridmim_components.weights.public_weights import convert_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def zoo_shaped(**kw) -> SwinUNETR:
    """A random SwinUNETR of the zoo file's shapes (62 M parameters; built once per module)."""
    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=14, feature_size=48, **kw)


@pytest.fixture(scope="module")
def zoo_net():
    return zoo_shaped()  # MONAI's current merging: what our hybridmim_swin_btcv finetune builds


@pytest.fixture(scope="module")
def zoo_net_legacy():
    return zoo_shaped(downsample=LegacyPatchMerging)


@pytest.fixture(scope="module")
def zoo_like_file(tmp_path_factory, zoo_net):
    """``models/model.pt`` of the zoo's layout and shapes, without a provenance record beside it."""
    path = tmp_path_factory.mktemp("finetune") / "model.pt"
    torch.save(zoo_net.state_dict(), path)
    return str(path)


def digest(path, kind):
    with open(path, "rb") as f:
        return hashlib.new(kind, f.read()).hexdigest()


def test_zoo_shaped_file_is_only_a_guess(zoo_like_file):
    state = torch.load(zoo_like_file, map_location="cpu", weights_only=True)
    converted = convert_checkpoint(state, path=zoo_like_file)
    assert converted.layout.name == "model_zoo_swin_unetr_btcv"
    assert converted.identified_by == "shapes"
    note = " ".join(converted.notes)
    assert "guess" in note and "--downsample" in note and provenance_path(zoo_like_file) in note
    assert convert_checkpoint(state).identified_by == "shapes"  # without the file: no digest to compare either


def test_own_zoo_shaped_finetune_without_record_loads_with_a_warning_not_a_demand(zoo_like_file, zoo_net, caplog):
    """Our hybridmim_swin_btcv finetune (MONAI's current merging) copied without its record: no refusal demanding
    merging_legacy; the log says the layout is a guess and how to state the truth."""
    with caplog.at_level(logging.INFO):
        report = load_pretrained_weights(zoo_net, zoo_like_file)
    assert report["identified_by"] == "shapes" and report["missing"] == []
    text = caplog.text
    assert "guess" in text and "--downsample merging_legacy" in text and provenance_path(zoo_like_file) in text
    assert "layout: MONAI model zoo swin_unetr_btcv_segmentation" in text
    assert "(a guess from tensor shapes only)" in text


def test_record_beside_the_file_states_the_truth(zoo_like_file, zoo_net, zoo_net_legacy, tmp_path, caplog):
    path = tmp_path / "model.pt"
    shutil.copy(zoo_like_file, path)
    write_provenance(path, make_record("SwinUNETR", 48, 1, {}, downsample="merging", source="hybridmim_swin_btcv"))
    with caplog.at_level(logging.INFO):
        report = load_pretrained_weights(zoo_net, str(path))
    assert report["identified_by"] == "shapes" and report["merging_from"].startswith("the provenance record")
    assert "guess" not in caplog.text and "patch merging 'merging' matches" in caplog.text
    with pytest.raises(PretrainedWeightsError, match="--downsample merging"):  # the record is believed
        load_pretrained_weights(zoo_net_legacy, str(path))


def test_a_known_digest_identifies_the_published_file(zoo_like_file, zoo_net, zoo_net_legacy, monkeypatch):
    """The digest table decides before the shapes: a file with a published digest is that file, merging order and
    all (here the tiny file's own md5, the zoo's hash type, stands in for the published one)."""
    assert ("md5", "50dd67a01b28a1d5487fd9ac27e682fb") in public_weights.KNOWN_FILE_HASHES  # the zoo's, large_files.yml
    md5 = digest(zoo_like_file, "md5")
    monkeypatch.setitem(public_weights.KNOWN_FILE_HASHES, ("md5", md5), "model_zoo_swin_unetr_btcv")
    with pytest.raises(PretrainedWeightsError, match="--downsample merging_legacy"):
        load_pretrained_weights(zoo_net, zoo_like_file)
    report = load_pretrained_weights(zoo_net_legacy, zoo_like_file)
    assert report["identified_by"] == "hash" and f"md5 {md5}" in report["merging_from"]


def test_known_file_computes_every_hash_type_of_the_table(tmp_path, monkeypatch):
    path = tmp_path / "weights.pt"
    torch.save(swin_state(seed=3), path)
    assert public_weights.known_file(path) is None
    sha = digest(path, "sha256")
    monkeypatch.setitem(public_weights.KNOWN_FILE_HASHES, ("sha256", sha), "suprem_swin")
    assert public_weights.known_file(path) == ("suprem_swin", f"sha256 {sha}")
    converted = convert_checkpoint(torch.load(path, weights_only=True), path=path)
    assert converted.layout.name == "suprem_swin" and converted.identified_by == "hash"
    assert converted.digest == f"sha256 {sha}" and not any("guess" in n for n in converted.notes)
    assert convert_checkpoint(torch.load(path, weights_only=True)).layout.name == "hybridmim_bundle"


# --- DAE: a file saved by the DAE pretraining code has a convolution stem MONAI's PatchEmbed cannot take ---


def dae_stem_file():
    """The DAE layout with its pretraining code's stem (UnetBasicBlock: conv1 3³ stride 2, norm1, conv2 3³, norm2)."""
    ckpt = dae_file(swin_state(seed=5, out_channels=1))
    model = ckpt["model"]
    del model["encoder.patch_embed.proj.weight"], model["encoder.patch_embed.proj.bias"]
    model["encoder.patch_embed.proj.conv1.conv.weight"] = torch.randn(FS, 1, 3, 3, 3)
    model["encoder.patch_embed.proj.conv2.conv.weight"] = torch.randn(FS, FS, 3, 3, 3)
    for norm in ("norm1", "norm2"):
        model[f"encoder.patch_embed.proj.{norm}.weight"] = torch.ones(FS)
        model[f"encoder.patch_embed.proj.{norm}.bias"] = torch.zeros(FS)
    return ckpt


def legacy_swin(seed=0):
    torch.manual_seed(seed)
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=FS, downsample=LegacyPatchMerging)


def test_dae_stem_file_loads_under_the_encoder_scope_saying_what_is_not_loaded(tmp_path, caplog):
    path = tmp_path / "dae.pth"
    torch.save(dae_stem_file(), path)
    converted = convert_checkpoint(torch.load(path, weights_only=True))
    assert converted.not_converted == ["swinViT.patch_embed.proj.bias", "swinViT.patch_embed.proj.weight"]
    net = legacy_swin()
    fresh = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("swinViT.patch_embed.")}
    with caplog.at_level(logging.WARNING):
        report = load_pretrained_weights(net, str(path), scope="encoder")
    assert sorted(n for n in report["left_to_train"] if "patch_embed" in n) == converted.not_converted
    assert "swinViT.layers1.0.blocks.0.attn.qkv.weight" in report["loaded"]
    for name, value in fresh.items():  # the stem is not loaded: PatchEmbed keeps its own initialisation
        assert torch.equal(net.state_dict()[name], value)
    text = caplog.text
    assert "convolution stem" in text and "swinViT.patch_embed" in text and "random" in text
    with pytest.raises(PretrainedWeightsError, match="convolution stem.*pretrained_scope encoder"):
        load_pretrained_weights(legacy_swin(), str(path), scope="all")


# --- import_weights: where the merging order came from ---


@pytest.fixture()
def pretrain_copy(tmp_path):
    out = tmp_path / "hybridmim_swin_pretrain"
    shutil.copytree(os.path.join(REPO_ROOT, "bundles", "hybridmim_swin_pretrain"), out,
                    ignore=shutil.ignore_patterns("models"))
    return out


def test_import_weights_does_not_invent_a_merging_order(tmp_path, pretrain_copy, capsys):
    """A file in MONAI's names without a record: the order is unknown; import_weights asks for --downsample
    instead of writing 'merging' into the record, and then says the order came from the flag."""
    from tools.weights import import_weights as iw

    src = tmp_path / "someones_swin.pt"
    torch.save(swin_state(seed=1), src)
    assert iw.main([str(src), "--out", str(pretrain_copy)]) == 2
    err = capsys.readouterr().err
    assert "--downsample" in err and provenance_path(str(src)) in err
    assert not os.path.exists(pretrain_copy / "models" / "model.pt")

    assert iw.main([str(src), "--out", str(pretrain_copy), "--downsample", "merging_legacy"]) == 0
    out = capsys.readouterr().out
    assert "merging_legacy" in out and "--downsample flag" in out
    record = read_provenance(pretrain_copy / "models" / "model.pt")
    assert record["downsample"] == "merging_legacy" and record["downsample_from"].startswith("the --downsample flag")


def test_import_weights_names_the_record_or_the_layout_as_the_source(tmp_path, pretrain_copy, capsys):
    from tools.weights import import_weights as iw

    src = tmp_path / "own.pt"
    torch.save(swin_state(seed=1), src)
    write_provenance(src, make_record("SwinUNETR", FS, 1, {}, downsample="merging", source="hybridmim_swin_pretrain"))
    report = iw.import_weights(str(src), str(pretrain_copy))
    assert report["overrides"]["downsample"] == "merging" and report["merging_from"].startswith("the provenance record")
    record = read_provenance(pretrain_copy / "models" / "model.pt")
    assert record["downsample_from"] == report["merging_from"]
    with pytest.raises(ValueError, match="provenance record.*merging.*--downsample merging_legacy"):
        iw.import_weights(str(src), str(pretrain_copy), force=True, downsample="merging_legacy")

    tang = tmp_path / "model_swinvit.pt"
    torch.save(tang_swinvit_file(swin_state(seed=2)), tang)
    report = iw.import_weights(str(tang), str(pretrain_copy), scope="encoder", force=True)
    assert report["overrides"]["downsample"] == "merging_legacy"
    assert "published layout" in report["merging_from"] and "tang_ssl_swinvit" in report["merging_from"]
