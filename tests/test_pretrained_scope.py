"""Loading pretrained weights beyond the exact-fit case: scope, other channel counts, merging order, provenance.

Hand computations on tiny networks; the bundle CLI paths are in ``tests/test_public_weights_cli.py``.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
from ignite.engine import Engine, Events
from monai.networks.nets import BasicUNet, SwinUNETR

from hybridmim_components import LegacyPatchMerging, PretrainedWeightsError, load_pretrained_weights
from hybridmim_components.weights.provenance import (
    PreprocessingMismatchError,
    ProvenanceRecorder,
    compare_preprocessing,
    make_record,
    provenance_path,
    read_provenance,
    window_intensity,
    write_provenance,
)
from hybridmim_components.weights.transfer import adapt_input_channels, network_merging

CT = {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "intensity": window_intensity(-1000, 1000), "crop": [96] * 3}


def swin(in_channels=1, out_channels=2, **kw) -> SwinUNETR:
    torch.manual_seed(kw.pop("seed", 0))
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=12, **kw).eval()


def unet(in_channels=1, out_channels=2, seed=0) -> BasicUNet:
    torch.manual_seed(seed)
    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                     features=(4, 4, 8, 8, 16, 4)).eval()


def save(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


def test_adapt_input_channels_by_hand():
    w = torch.arange(2 * 3 * 1 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1, 1)  # O=2, C0=3
    out = adapt_input_channels(w, 4)
    assert out.shape == (2, 4, 1, 1, 1)
    # row o: mean over the 3 input channels (o*3 + 1), times C0/C = 3/4, in each of the 4 channels
    for o in range(2):
        assert torch.allclose(out[o, :, 0, 0, 0], torch.full((4,), (3 * o + 1) * 3 / 4))


@pytest.mark.parametrize("make", [swin, unet], ids=["swin", "unet"])
def test_one_channel_weights_adapted_to_four_give_the_same_output_on_equal_channels(make, tmp_path):
    one = make(in_channels=1, seed=1)
    path = save(one.state_dict(), tmp_path / "ct.pt")
    four = make(in_channels=4, seed=2)
    with pytest.raises(PretrainedWeightsError, match="adapt_in_channels"):
        load_pretrained_weights(four, path)
    report = load_pretrained_weights(four, path, adapt_in_channels=True)
    assert report["adapted"] and not report["missing"] and not report["mis_shaped"]
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        expected, got = one(x), four(x.repeat(1, 4, 1, 1, 1))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # a 4-channel input of different channels gives something else: the channels are really all read
    with torch.no_grad():
        other = four(torch.cat([x, x, x, x.flip(2)], 1))
    assert not torch.allclose(other, expected, atol=1e-3)


def test_encoder_scope_loads_a_swin_encoder_only_file_and_leaves_the_decoder_fresh(tmp_path):
    source = swin(seed=1).state_dict()
    encoder_only = {k: v for k, v in source.items() if k.startswith("swinViT.")}
    path = save(encoder_only, tmp_path / "swinvit.pt")
    net = swin(seed=2)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PretrainedWeightsError, match='pretrained_scope "encoder"') as err:
        load_pretrained_weights(net, path)  # the default scope wants the decoder too
    assert any(n.startswith("decoder1.") for n in err.value.report["missing"])
    report = load_pretrained_weights(net, path, scope="encoder")
    assert report["loaded"] == sorted(encoder_only)
    state = net.state_dict()
    for name, value in state.items():
        want = encoder_only[name] if name in encoder_only else fresh[name]
        assert torch.equal(value, want), name


def test_encoder_scope_ignores_a_files_decoder_but_loads_its_skip_blocks(tmp_path):
    source = swin(seed=1).state_dict()
    path = save(source, tmp_path / "full.pt")
    net = swin(seed=2)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_pretrained_weights(net, path, scope="encoder")
    state = net.state_dict()
    for name in state:
        from_file = name.startswith(("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10."))
        assert torch.equal(state[name], source[name] if from_file else fresh[name]), name
    assert any(n.startswith("decoder5.") for n in report["left_to_train"])
    # an encoder file missing a Swin tensor still stops
    broken = {k: v for k, v in source.items() if k != "swinViT.layers2.0.blocks.0.attn.qkv.weight"}
    with pytest.raises(PretrainedWeightsError, match="swinViT.layers2.0.blocks.0.attn.qkv.weight"):
        load_pretrained_weights(swin(), save(broken, tmp_path / "broken.pt"), scope="encoder")


def test_unet_encoder_scope(tmp_path):
    source = unet(seed=1).state_dict()
    net = unet(seed=2)
    report = load_pretrained_weights(net, save(source, tmp_path / "u.pt"), scope="encoder")
    assert report["loaded"] == sorted(k for k in source if k.startswith(("conv_0.", "down_")))
    with pytest.raises(ValueError, match="pretrained_scope"):
        load_pretrained_weights(net, tmp_path / "u.pt", scope="decoder")


def test_merging_order_recorded_with_the_weights_must_match_the_network(tmp_path):
    source = swin(seed=1)
    path = save(source.state_dict(), tmp_path / "model.pt")
    record = make_record("SwinUNETR", 12, 1, CT, downsample="merging_legacy")
    write_provenance(path, record)
    assert network_merging(swin()) == "merging"
    with pytest.raises(PretrainedWeightsError, match="downsample") as err:
        load_pretrained_weights(swin(), path)
    assert "merging_legacy" in str(err.value)
    legacy = swin(seed=2, downsample=LegacyPatchMerging)
    assert network_merging(legacy) == "merging_legacy"
    load_pretrained_weights(legacy, path)
    assert torch.equal(legacy.swinViT.layers1[0].downsample.reduction.weight,
                       source.swinViT.layers1[0].downsample.reduction.weight)


def test_preprocessing_mismatch_warns_naming_each_field_or_stops_when_strict(tmp_path, caplog):
    path = save(unet(seed=1).state_dict(), tmp_path / "model.pt")
    write_provenance(path, make_record("BasicUNet", [4, 4, 8, 8, 16, 4], 1, CT))
    assert read_provenance(path)["preprocessing"]["spacing"] == [1.5, 1.5, 2.0]
    ours = dict(CT, spacing=[1.0, 1.0, 1.0], intensity=window_intensity(-175, 250))
    with caplog.at_level(logging.WARNING):
        report = load_pretrained_weights(unet(), path, expected_preprocessing=ours)
    assert [m.split(":")[0] for m in report["preprocessing_mismatches"]] == ["spacing", "intensity"]
    assert "spacing: weights [1.5, 1.5, 2.0], this bundle [1.0, 1.0, 1.0]" in caplog.text
    with pytest.raises(PreprocessingMismatchError, match="strict_preprocessing"):
        load_pretrained_weights(unet(), path, expected_preprocessing=ours, strict_preprocessing=True)
    assert load_pretrained_weights(unet(), path, expected_preprocessing=CT)["preprocessing_mismatches"] == []


def test_compare_skips_fields_nobody_stated():
    record = {"preprocessing": {"spacing": None, "orientation": "RAS", "intensity": None, "crop": [96, 96, 96]}}
    assert compare_preprocessing(record, dict(CT, crop=[64, 64, 64])) == ["crop: weights [96, 96, 96], this bundle [64, 64, 64]"]
    assert compare_preprocessing(record, dict(CT, spacing=[9.0, 9.0, 9.0])) == []


def test_provenance_recorder_records_the_step_at_which_the_weights_were_saved(tmp_path):
    weights = tmp_path / "models" / "model.pt"
    record = make_record("BasicUNet", [4] * 6, 1, CT, pool_size=3, steps_planned=6, source="test")
    saves = {2: 1}  # epoch 2 saves better weights (as the best-model saver does in validation)

    def step(engine, batch):
        return 0.0

    engine = Engine(step)
    recorder = ProvenanceRecorder(str(weights), record)

    @engine.on(Events.EPOCH_COMPLETED)
    def fake_best_model_save(engine):  # registered before the recorder, as the validation handler is
        if engine.state.epoch in saves:
            weights.parent.mkdir(exist_ok=True)
            torch.save({"w": torch.tensor([float(engine.state.epoch)])}, weights)

    recorder.attach(engine)
    engine.run(range(2), max_epochs=3)  # 2 iterations per epoch
    written = json.loads(open(provenance_path(weights)).read())
    assert written["steps_done"] == 4 and written["steps_planned"] == 6 and written["pool_size"] == 3
    assert written["monai_version"] and written["preprocessing"]["spacing"] == [1.5, 1.5, 2.0]


def test_tang_file_loads_as_monai_load_from_reads_it(tmp_path):
    from test_public_weights import tang_swinvit_file

    raw = tang_swinvit_file(swin(seed=1).state_dict())
    path = save(raw, tmp_path / "model_swinvit.pt")
    monais = swin(seed=2)
    ours = swin(seed=2, downsample=LegacyPatchMerging)  # the file is pre-1.5: the loader insists on the old order
    report = load_pretrained_weights(ours, path, scope="encoder")
    assert report["layout"].startswith("SwinUNETR self-supervised Swin encoder")
    assert sorted(report["unexpected"]) == ["norm.bias", "norm.weight"]  # Tang's final LayerNorm: no counterpart
    monais.load_from(raw)
    theirs = dict(monais.named_parameters())
    for name, value in ours.named_parameters():
        if name.startswith("swinViT."):
            assert torch.equal(value, theirs[name]), name
    with pytest.raises(PretrainedWeightsError, match="--downsample merging_legacy"):
        load_pretrained_weights(swin(), path, scope="encoder")


def test_swinunetr_v2_weights_into_a_v1_network_stop_naming_use_v2(tmp_path):
    v2 = swin(seed=1, use_v2=True).state_dict()
    assert any(k.startswith("swinViT.layers1c.") for k in v2)
    path = save(v2, tmp_path / "v2.pt")
    with pytest.raises(PretrainedWeightsError, match="use_v2 true"):
        load_pretrained_weights(swin(), path)  # every v1 tensor is there: only the extra v2 blocks give it away
    assert load_pretrained_weights(swin(seed=2, use_v2=True), path)["missing"] == []
