"""rrn: region targets, the filter's extremes, the streams, the store, and W workers = 1."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from raysegbg.config import load_config
from raysegbg.data.loader import SegDataset
from raysegbg.data.synthetic import make_dataset
from raysegbg.errors import RaysegbgError
from raysegbg.local import train_local
from raysegbg.methods.rrn.method import Rrn
from raysegbg.methods.rrn.regions import (
    cutmix_boxes,
    discriminator_loss,
    kept,
    mix,
    partners,
    region_accuracy,
)  # fmt: skip
from raysegbg.ray_train import preflight
from raysegbg.state.store import PseudoLabelStore
from raysegbg.train import Trainer, WorkerContext
from tests.conftest import tiny_overrides
from tests.multiproc import run_ranks
from tests.tb_read import tags

RRN = {"method.name": "rrn", "method.rrn.labeled_fraction": 0.5}


def rrn_config(data: Path, root: Path, **extra):
    return load_config(None, tiny_overrides(data, root, **{**RRN, **extra}))


def test_region_targets_are_each_regions_accuracy_on_labeled_pixels():
    gen = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 3, (2, 16, 16), generator=gen)
    masks[0, :5, :7] = 255  # ignored pixels count neither as right nor wrong
    masks[1, 8:, 8:] = 255  # a region with no labelled pixel
    pred = torch.randint(0, 3, (2, 16, 16), generator=gen)
    accuracy, weight = region_accuracy(pred, masks, 8, 255)
    assert accuracy.shape == weight.shape == (2, 2, 2)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                m = masks[b, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8]
                p = pred[b, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8]
                labelled = m != 255
                want = (p == m)[labelled].float().mean().item() if labelled.any() else 0.0
                assert accuracy[b, i, j].item() == pytest.approx(want)
                assert weight[b, i, j].item() == pytest.approx(labelled.float().mean().item())
    assert weight[1, 1, 1] == 0


def test_the_discriminator_learns_region_accuracy_of_its_networks_labeled_prediction(
    tiny_data, tmp_path
):
    cfg = rrn_config(tiny_data, tmp_path, **{"method.rrn.region": 8})
    method = Rrn(cfg, 2, 3, 255)
    images = torch.randn(2, 3, 32, 32)
    masks = torch.randint(0, 2, (2, 32, 32))
    logits = torch.randn(2, 2, 32, 32)
    accuracy, weight = region_accuracy(logits.argmax(1), masks, 8, 255)
    scores = method.disc1(images, logits.softmax(1))
    assert scores.shape == (2, 4, 4)
    want = discriminator_loss(scores, accuracy, weight)
    assert method.disc_loss(method.disc1, images, logits, masks).item() == pytest.approx(
        want.item()
    )
    # a discriminator that predicts each region's accuracy exactly is at the loss's minimum
    exact = torch.logit(accuracy.clamp(1e-4, 1 - 1e-4))
    assert discriminator_loss(exact, accuracy, weight) < discriminator_loss(
        scores, accuracy, weight
    )


def test_threshold_zero_keeps_every_region_and_one_drops_every_region(tiny_data, tmp_path):
    # extreme logits whose sigmoid rounds to exactly 0 or 1 in float32 included
    scores = torch.tensor([[[-1e4, -104.0], [-30.0, 0.0]], [[30.0, 104.0], [1e4, 2.0]]])
    assert kept(scores, 0.0).all() and not kept(scores, 1.0).any()
    assert kept(scores, 0.5).tolist() == [[[False, False], [False, False]],
                                          [[True, True], [True, True]]]  # fmt: skip
    labels = [torch.zeros(2, 4, 4, dtype=torch.long), torch.ones(2, 4, 4, dtype=torch.long)]
    for threshold, want in ((0.0, 1.0), (1.0, 0.0)):
        cfg = rrn_config(tiny_data, tmp_path, **{"method.rrn.threshold": threshold,
                                                 "method.rrn.region": 2,
                                                 "method.rrn.correction": "false"})  # fmt: skip
        weights = Rrn(cfg, 2, 3, 255).region_weights(labels, [scores, scores], filtering=True)
        assert all(bool((w == want).all()) for w in weights)


def test_correction_weighs_a_region_by_the_share_on_which_the_networks_agree(tiny_data, tmp_path):
    cfg = rrn_config(tiny_data, tmp_path, **{"method.rrn.threshold": 0.0, "method.rrn.region": 2})
    a = torch.zeros(1, 2, 4, dtype=torch.long)
    b = a.clone()
    b[0, 0, 0] = 1  # one of the first region's four pixels differs
    b[0, :, 2:] = 1  # the second region differs everywhere
    scores = torch.zeros(1, 1, 2)
    w1, _ = Rrn(cfg, 2, 3, 255).region_weights([a, b], [scores, scores], filtering=True)
    assert w1.tolist() == [[[0.75, 0.75, 0.0, 0.0], [0.75, 0.75, 0.0, 0.0]]]
    # before the warm-up ends, nothing is filtered or re-weighted
    w1, _ = Rrn(cfg, 2, 3, 255).region_weights([a, b], [scores, scores], filtering=False)
    assert bool((w1 == 1).all())


def test_cutmix_depends_on_the_image_not_on_the_rank():
    ids = ["a", "b", "c", "d"]
    whole = cutmix_boxes(ids, 0, 5, (32, 32))
    halves = torch.cat(
        [cutmix_boxes(ids[:2], 0, 5, (32, 32)), cutmix_boxes(ids[2:], 0, 5, (32, 32))]
    )
    assert torch.equal(whole, halves)
    area = whole.mean((1, 2))
    assert bool(((area > 0.2) & (area < 0.55)).all())
    assert partners(4).tolist() == [1, 0, 3, 2] and partners(3).tolist() == [1, 0, 2]
    x = torch.arange(4.0)[:, None, None, None].expand(4, 1, 32, 32)
    mixed = mix(x, whole, partners(4))
    assert torch.equal(mixed[0][0][whole[0].bool()], torch.ones(int(whole[0].sum())))
    labels = mix(torch.zeros(4, 32, 32, dtype=torch.long), whole, partners(4))
    assert labels.dtype == torch.long


def test_streams_split_the_training_set_and_hide_the_unlabeled_masks(tiny_data, tmp_path):
    cfg = rrn_config(tiny_data, tmp_path)
    trainer = Trainer(cfg, WorkerContext(run_dir=tmp_path / "unused"))
    everything = SegDataset(tiny_data, "train")
    labeled, unlabeled = set(trainer.train_ds.ids), set(trainer.unlabeled_ds.ids)
    assert labeled and unlabeled and not labeled & unlabeled
    assert labeled | unlabeled == set(everything.ids)
    batch = next(trainer.loader.epoch(0))
    assert set(batch.ids) <= labeled and set(batch.unlabeled.ids) <= unlabeled
    assert bool((batch.unlabeled.masks == 255).all())  # the training step cannot see them
    assert bool((batch.masks != 255).any())


def test_without_unlabeled_rows_the_labeled_images_are_the_unlabeled_stream(tiny_data, tmp_path):
    cfg = rrn_config(tiny_data, tmp_path, **{"method.rrn.labeled_fraction": 1.0})
    preflight(cfg, None)  # runs (and is searched) on any dataset with masks
    lines = []
    trainer = Trainer(cfg, WorkerContext(run_dir=tmp_path / "unused", log=lines.append))
    assert trainer.unlabeled_ds.ids == trainer.train_ds.ids
    assert bool((next(trainer.loader.epoch(0)).unlabeled.masks == 255).all())
    assert "no unlabeled rows" in lines[0]
    no_masks = tmp_path / "no_masks"
    make_dataset("hetero_bg", no_masks, n=20, size=32, seed=0, labeled_fraction=0.0)
    with pytest.raises(RaysegbgError, match="no labeled samples"):
        preflight(rrn_config(no_masks, tmp_path), None)


def test_the_oracle_filter_scores_regions_by_their_true_accuracy(tiny_data, tmp_path):
    """filter=oracle (the diagnostic upper bound): regions are kept by their accuracy against
    the hidden masks, which only this filter's unlabeled stream carries."""
    extra = {"method.rrn.filter": "oracle", "method.rrn.threshold": 0.9, "train.epochs": 1}
    cfg = rrn_config(tiny_data, tmp_path, **extra)
    unl = next(Trainer(cfg, WorkerContext(run_dir=tmp_path / "unused")).loader.epoch(0)).unlabeled
    assert {0, 1} <= set(unl.masks.unique().tolist())  # the hidden ground truth, augmented
    plain = next(Trainer(rrn_config(tiny_data, tmp_path), WorkerContext(run_dir=tmp_path / "u"))
                 .loader.epoch(0)).unlabeled  # fmt: skip
    assert bool((plain.masks == 255).all())  # the method itself never sees it
    metrics, _ = train_local(cfg, tmp_path / "run", log=lambda line: None)
    assert 0 < metrics["rrn/kept_share"] < 1  # an untrained network: some regions each way
    assert metrics["rrn/kept_acc"] > 0.9 >= metrics["rrn/dropped_acc"]
    with pytest.raises(RaysegbgError, match="filter=oracle scores regions with the hidden"):
        preflight(rrn_config(tiny_data, tmp_path, **{**extra, "method.rrn.labeled_fraction": 1}),
                  None)  # fmt: skip


def test_inference_averages_the_two_networks(tiny_data, tmp_path):
    images = torch.randn(2, 3, 32, 32)
    method = Rrn(rrn_config(tiny_data, tmp_path), 2, 3, 255).eval()
    with torch.no_grad():
        p1, p2 = method.net1(images).softmax(1), method.net2(images).softmax(1)
        assert not torch.allclose(p1, p2)  # two initialisations
        torch.testing.assert_close(method.predict(images).exp(), (p1 + p2) / 2)
        only = Rrn(rrn_config(tiny_data, tmp_path, **{"method.rrn.inference": "net2"}), 2, 3, 255)
        only.load_state_dict(method.state_dict())
        torch.testing.assert_close(only.eval().predict(images), method.net2(images))


def test_each_epoch_stores_pseudo_labels_and_logs_kept_versus_dropped(tiny_data, tmp_path):
    cfg = rrn_config(tiny_data, tmp_path, **{"method.rrn.warmup_share": 0.5})
    metrics, _ = train_local(cfg, tmp_path / "run", log=lambda line: None)
    for key in ("rrn/kept_acc", "rrn/dropped_acc", "rrn/kept_share", "rrn/pseudo_acc"):
        assert key in metrics
    assert 0 <= metrics["rrn/pseudo_acc"] <= 1 and 0 <= metrics["rrn/kept_share"] <= 1
    store = PseudoLabelStore.load(tmp_path / "run" / "state" / "labels")
    hidden = SegDataset(tiny_data, "train", rows="unlabeled", labeled_fraction=0.5)
    assert sorted(store.ids()) == sorted(f"{i}@net{k}" for i in hidden.ids for k in (1, 2))
    item = store.get([f"{hidden.ids[0]}@net1"])[0]
    assert item.mask.shape == (32, 32) and item.confidence.shape == (math.ceil(32 / 8) ** 2,)
    assert bool(((item.confidence > 0) & (item.confidence < 1)).all())
    logged = tags(tmp_path / "run" / "tb")
    assert {"rrn/kept_share", "rrn/pseudo_acc", "train/cps", "train/disc"} <= set(logged["scalars"])
    for key in ("rrn/kept_acc", "rrn/dropped_acc"):  # NaN (not logged) when no region is
        assert key in logged["scalars"] or math.isnan(metrics[key])
    assert "rrn/kept_regions" in logged["images"]
    assert "rrn/region_scores" in logged["histograms"]


def first_step(rank: int, world: int, overrides: list[str]) -> dict:
    """Losses and every optimiser's gradients (after DDP's all-reduce) of the first step, in
    float64: pseudo-labels are argmaxes, and an untrained network's classes are nearly tied,
    so float32 rounding (all-reduces sum in another order) flips a few pixels' targets."""
    torch.set_default_dtype(torch.float64)
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, WorkerContext(run_dir=Path("unused"), rank=rank, world_size=world))
    runner, grads = trainer.runner, {}
    apply = runner.step

    def record(*names):
        for name in names:
            for pname, p in runner.specs[name].module.named_parameters():
                if p.grad is not None:
                    grads[f"{name}.{pname}"] = p.grad.clone()
        apply(*names)

    runner.step = record
    batch = next(trainer.loader.epoch(0))
    trainer.method.train()
    losses = trainer.method.training_step(batch, runner)
    ids = batch.ids + batch.unlabeled.ids
    return {"losses": {k: v.item() for k, v in losses.items()}, "grads": grads, "ids": ids}


def test_two_workers_give_one_workers_losses_and_gradients(tiny_data, tmp_path):
    """Networks and discriminators alike, with filtering and correction on from step 0."""
    extra = {**RRN, "method.rrn.warmup_share": 0, "method.rrn.threshold": 0.5}
    overrides = tiny_overrides(tiny_data, tmp_path, **extra)
    (single,) = run_ranks(first_step, 1, overrides)
    pair = run_ranks(first_step, 2, overrides)
    assert sorted(pair[0]["ids"] + pair[1]["ids"]) == sorted(single["ids"])
    for name, value in single["losses"].items():
        assert (pair[0]["losses"][name] + pair[1]["losses"][name]) / 2 == pytest.approx(
            value, rel=1e-6
        ), name
    assert single["losses"]["cps"] > 0
    assert {k.split(".")[0] for k in single["grads"]} == {"net1", "net2", "disc1", "disc2"}
    assert single["grads"].keys() == pair[0]["grads"].keys()
    for name, g in single["grads"].items():
        for rank in (0, 1):
            torch.testing.assert_close(pair[rank]["grads"][name], g, rtol=1e-7, atol=1e-12)


def test_settings_are_checked(tiny_data, tmp_path):
    for key, value, words in (
        ("threshold", 1.5, "threshold must be in"),
        ("region", 6, "power of 2"),
        ("labeled_fraction", 0, "labeled_fraction must be in"),
        ("inference", "both", "inference"),
    ):
        with pytest.raises(RaysegbgError, match=words):
            rrn_config(tiny_data, tmp_path, **{f"method.rrn.{key}": value})
    assert np.isclose(rrn_config(tiny_data, tmp_path).method.rrn.threshold, 0.97)
