"""Hand-computed checks of the workflow pieces (pretext metrics, prepare_batch, checkpoints, preview, progress bar)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.utils import CommonKeys as Keys

from hybridmim_components.workflow.checkpoints import (
    BestMetricState,
    ResumeFromLatestCheckpoint,
    latest_checkpoint,
    load_pretrain_checkpoint,
)
from hybridmim_components.workflow.pretext_metrics import (
    LocationAccuracy,
    MaskedReconstructionMSE,
    NumberAccuracy,
    lower_is_better,
)
from hybridmim_components.workflow.pretrain import PrepareMIMBatch, loss_terms_transform
from hybridmim_components.workflow.previews import MIMPreviewHandler
from hybridmim_components.workflow.progress import TrainProgressBar, loss_of
from hybridmim_components.workflow.seeding import ReseedHandler


def _mse_example():
    """Crop 4³ with patch size 2 (patch grid 2³), region = voxels [2:4]³ (the last patch in each axis).

    Sample 0: patch (1,1,1) masked -> the whole region (8 voxels) is masked; error 1 everywhere -> sum 8.
    Sample 1: nothing masked in the region (only patch (0,0,0)) -> contributes nothing.
    Expected MSE = 8 / 8 = 1 (channels: C=1).
    """
    target = torch.zeros(2, 1, 4, 4, 4)
    patch_mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    patch_mask[0, 1, 1, 1] = True
    patch_mask[1, 0, 0, 0] = True
    recon = torch.ones(2, 1, 2, 2, 2)
    pred = {"reconstruction": recon, "region_slices": (slice(2, 4),) * 3}
    return pred, {"mim_target": target, "mim_patch_mask": patch_mask}


def test_masked_reconstruction_mse_hand_computed():
    pred, targets = _mse_example()
    metric = MaskedReconstructionMSE()
    metric.reset()
    metric.update((pred, targets))
    assert metric.compute() == pytest.approx(1.0)
    # a second batch: sample 0 masked everywhere in the region with error 2 (sum 8·4 = 32 over 8 voxels)
    pred2, targets2 = _mse_example()
    pred2["reconstruction"] = torch.full((2, 1, 2, 2, 2), 2.0)
    metric.update((pred2, targets2))
    # voxel-weighted over both batches: (8 + 32) / (8 + 8)
    assert metric.compute() == pytest.approx(40 / 16)


def test_masked_reconstruction_mse_two_channels_and_partial_region():
    # C=2; the region [1:3]³ overlaps patch (0,0,0) (voxels [0:2]) on its first voxel only in each axis
    target = torch.zeros(1, 2, 4, 4, 4)
    patch_mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    patch_mask[0, 0, 0, 0] = True
    recon = torch.zeros(1, 2, 2, 2, 2)
    recon[0, 0, 0, 0, 0] = 3.0  # masked voxel (1,1,1), channel 0: error 9
    recon[0, 1, 1, 1, 1] = 5.0  # unmasked voxel: ignored
    pred = {"reconstruction": recon, "region_slices": (slice(1, 3),) * 3}
    metric = MaskedReconstructionMSE()
    metric.update((pred, {"mim_target": target, "mim_patch_mask": patch_mask}))
    assert metric.compute() == pytest.approx(9 / 2)  # 1 masked voxel × 2 channels


def test_masked_reconstruction_mse_nothing_masked_is_nan():
    pred, targets = _mse_example()
    targets["mim_patch_mask"][:] = False
    metric = MaskedReconstructionMSE()
    metric.update((pred, targets))
    assert math.isnan(metric.compute())


def test_number_accuracy_hand_computed():
    logits = torch.zeros(2, 3, 9)
    logits[0, 0, 4] = logits[0, 1, 2] = logits[0, 2, 8] = 1.0  # predicts 4, 2, 8
    logits[1, 0, 0] = logits[1, 1, 1] = logits[1, 2, 3] = 1.0  # predicts 0, 1, 3
    count = torch.tensor([[4, 3, 8], [0, 0, 0]])
    metric = NumberAccuracy()
    metric.update(({"number_logits": logits}, {"mim_count": count}))
    assert metric.compute() == pytest.approx(3 / 6)


def test_location_accuracy_hand_computed():
    logits = torch.tensor([[[2.0, -1.0, 0.5, -3.0, 1.0, 1.0, -1.0, -1.0]]])  # predicts 1 0 1 0 1 1 0 0
    labels = torch.tensor([[[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]]])
    metric = LocationAccuracy()
    metric.update(({"location_logits": logits}, {"mim_location": labels}))
    assert metric.compute() == pytest.approx(5 / 8)


def test_metrics_read_the_engine_output_dict():
    """Attached to an engine, the metrics pick pred/label from the (not decollated) engine output."""
    pred, targets = _mse_example()

    def step(engine, batch):
        return {Keys.IMAGE: None, Keys.LABEL: targets, Keys.PRED: pred}

    engine = Engine(step)
    MaskedReconstructionMSE().attach(engine, "mse")
    engine.run([0, 1], max_epochs=1)
    assert engine.state.metrics["mse"] == pytest.approx(1.0)


def test_lower_is_better():
    assert lower_is_better(0.1, 0.2) and not lower_is_better(0.3, 0.2)


def test_prepare_mim_batch_returns_image_and_targets():
    batch = {
        "image": torch.rand(1, 1, 4, 4, 4),
        "mim_target": torch.rand(1, 1, 4, 4, 4),
        "mim_patch_mask": torch.zeros(1, 2, 2, 2, dtype=torch.bool),
        "mim_count": torch.zeros(1, 1, dtype=torch.int64),
        "mim_location": torch.zeros(1, 1, 8),
        "other": "ignored",
    }
    image, targets = PrepareMIMBatch()(batch, torch.device("cpu"))
    assert torch.equal(image, batch["image"])
    assert set(targets) == {"mim_target", "mim_patch_mask", "mim_count", "mim_location"}
    with pytest.raises(KeyError, match="HierarchicalMaskd"):
        PrepareMIMBatch()({"image": batch["image"]}, None)


def test_loss_terms_transform_logs_terms_and_lr():
    class FakeLoss:
        last_terms = {"loss": torch.tensor(1.5), "reconstruction": torch.tensor(0.5)}

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.25)
    values = loss_terms_transform(FakeLoss(), optimizer)({"loss": torch.tensor(9.0)})
    assert values == {"train_loss": 1.5, "train_reconstruction": 0.5, "lr": 0.25}


def test_latest_checkpoint(tmp_path):
    """Nothing to resume from: no folder, an empty one, or only the backbone file (progress order: test_resume)."""
    assert latest_checkpoint(str(tmp_path)) is None
    assert latest_checkpoint(str(tmp_path / "absent")) is None
    torch.save({"weight": torch.zeros(1)}, tmp_path / "model.pt")  # the backbone file is not a training checkpoint
    assert latest_checkpoint(str(tmp_path)) is None


def test_resume_handler_restores_trainer_state(tmp_path):
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    engine.run([0, 1, 2], max_epochs=1)
    torch.save({"network": net.state_dict(), "trainer": engine.state_dict()}, str(tmp_path / "checkpoint_final.pt"))

    fresh_net = torch.nn.Linear(2, 2)
    fresh = Engine(lambda e, b: None)
    handler = ResumeFromLatestCheckpoint(str(tmp_path), {"network": fresh_net, "trainer": fresh}, enabled=True)
    handler.attach(fresh)
    fresh.run([0, 1, 2], max_epochs=2)
    assert handler.path.endswith("checkpoint_final.pt")
    assert fresh.state.iteration == 6  # 3 restored + 3 of the second epoch
    assert torch.equal(fresh_net.weight, net.weight)

    disabled = Engine(lambda e, b: None)
    ResumeFromLatestCheckpoint(str(tmp_path), {"trainer": disabled}, enabled=False).attach(disabled)
    disabled.run([0, 1, 2], max_epochs=1)
    assert disabled.state.iteration == 3


def test_load_pretrain_checkpoint(tmp_path):
    from hybridmim_components import HybridMIMUNet

    kwargs = dict(features=(4, 4, 8, 8, 16, 4), region_size=32)
    trained, fresh = HybridMIMUNet(**kwargs), HybridMIMUNet(**kwargs)
    torch.save(trained.backbone.state_dict(), str(tmp_path / "model.pt"))
    load_pretrain_checkpoint(fresh, str(tmp_path / "model.pt"))
    for k, v in trained.backbone.state_dict().items():
        assert torch.equal(v, fresh.backbone.state_dict()[k])
    assert not torch.equal(trained.number_head.weight, fresh.number_head.weight)  # heads not in model.pt
    torch.save(trained.state_dict(), str(tmp_path / "pretrain_network.pt"))
    load_pretrain_checkpoint(fresh, str(tmp_path / "model.pt"), str(tmp_path / "pretrain_network.pt"))
    assert torch.equal(trained.number_head.weight, fresh.number_head.weight)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_pretrain_checkpoint(fresh, str(tmp_path / "absent.pt"))


def test_preview_image_layout():
    image = torch.zeros(1, 1, 8, 8, 8)
    target = torch.arange(8 * 8 * 8, dtype=torch.float32).reshape(1, 1, 8, 8, 8)
    recon = torch.zeros(1, 1, 4, 4, 4)
    output = {
        Keys.IMAGE: image,
        Keys.LABEL: {"mim_target": target},
        Keys.PRED: {"reconstruction": recon, "region_slices": (slice(2, 6),) * 3},
    }
    preview = MIMPreviewHandler.preview(output)
    assert preview.shape == (4, 12)  # masked | reconstruction | original, each 4×4
    # original panel: middle axial slice (z = 2 + 4 // 2) of the region, transposed and flipped (anterior up),
    # min-max scaled; the zero panels fall below the original's minimum and are clipped to 0
    original = target[0, 0, 2:6, 2:6, 4].numpy()
    expected = np.flipud(original.T)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(preview[:, 8:], expected, rtol=1e-6)
    assert np.all(preview[:, :8] == 0)


def test_reseed_handler_repeats_random_draws():
    from monai.transforms import Compose, RandSpatialCropd

    transform = Compose([RandSpatialCropd(keys="image", roi_size=(2, 2, 2), random_size=False)])
    data = {"image": torch.arange(64.0).reshape(1, 4, 4, 4)}
    reseed = ReseedHandler(seed=3, transform=transform, generator=torch.Generator())
    reseed()
    first = transform(dict(data))["image"]
    transform(dict(data))
    reseed()
    assert torch.equal(transform(dict(data))["image"], first)


def test_best_metric_state_round_trip(tmp_path):
    """The best validation (evaluator state and best-model saver records) survives a checkpoint round trip."""
    from monai.engines import SupervisedEvaluator
    from monai.handlers import CheckpointSaver

    def make():
        net = torch.nn.Linear(1, 1)
        evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=[0], network=net)
        saver = CheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net}, save_key_metric=True,
                                key_metric_name="mse", key_metric_filename="model.pt", key_metric_negative_sign=True)
        return evaluator, saver

    evaluator, saver = make()
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.25, 3
    saver._key_metric_checkpoint._saved.append(saver._key_metric_checkpoint.Item(-0.25, "model.pt"))
    path = str(tmp_path / "state.pt")
    torch.save(BestMetricState(evaluator, [saver]).state_dict(), path)

    evaluator2, saver2 = make()
    BestMetricState(evaluator2, [saver2, None]).load_state_dict(torch.load(path, weights_only=True))
    assert (evaluator2.state.best_metric, evaluator2.state.best_metric_epoch) == (0.25, 3)
    assert [tuple(i) for i in saver2._key_metric_checkpoint._saved] == [(-0.25, "model.pt")]


def test_best_metric_state_keeps_model_pt_against_a_worse_validation(tmp_path):
    """After a restore, a worse key metric leaves model.pt alone and a better one replaces it (higher is better)."""
    from monai.engines import SupervisedEvaluator
    from monai.handlers import CheckpointSaver

    net = torch.nn.Linear(1, 1)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=[0], network=net)
    saver = CheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net}, save_key_metric=True,
                            key_metric_name="dice", key_metric_filename="model.pt")
    BestMetricState(evaluator, [saver]).load_state_dict(
        {"best_metric": 0.5, "best_metric_epoch": 1, "savers": [{"_saved": [(0.5, "model.pt")]}]}
    )
    torch.save({"marker": torch.zeros(1)}, str(tmp_path / "model.pt"))  # the best model of the interrupted run
    engine = Engine(lambda e, b: None)
    for dice, replaced in ((0.4, False), (0.5, False), (0.6, True)):
        engine.state.metrics = {"dice": dice}
        saver.metrics_completed(engine)
        assert ("marker" not in torch.load(str(tmp_path / "model.pt"), weights_only=True)) == replaced, dice


@pytest.mark.parametrize(
    "output",
    [
        {"loss": torch.tensor(0.25), "pred": None},  # pretraining trainer (decollate=False): one dict
        [{"loss": torch.tensor(0.25), "pred": None}, {"loss": torch.tensor(0.25), "pred": None}],  # finetuning
    ],
)
def test_progress_bar_shows_the_loss(output, capsys):
    assert loss_of(output) == {"loss": 0.25}
    engine = Engine(lambda e, b: output)
    TrainProgressBar(persist=True).attach(engine)
    engine.run([0, 1], max_epochs=1)
    assert "loss=0.25" in capsys.readouterr().err


def test_progress_bar_reads_the_loss_without_a_grad_warning():
    import warnings

    from hybridmim_components.workflow.progress import loss_of

    loss = torch.tensor(0.5, requires_grad=True) * 2  # the trainer's output loss still carries its graph
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a tensor that requires grad is turned into a float
        assert loss_of({"loss": loss}) == {"loss": 1.0}
        assert loss_of([{"loss": loss}, {"loss": loss}]) == {"loss": 1.0}
