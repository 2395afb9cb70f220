"""PatchRefineNet: three stages in one run, pseudo-labels in the store, resume, DDP."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from raysegbg.checkpoint import list_checkpoints, load_state
from raysegbg.config import load_config
from raysegbg.data.loader import in_holdout
from raysegbg.errors import RaysegbgError
from raysegbg.local import train_local
from raysegbg.methods.base import Batch, StepInfo
from raysegbg.methods.patch_thresholds import (
    patch_iou_table,
    patch_pseudo_labels,
    threshold_grid,
)
from raysegbg.methods.prn.labels import label_key
from raysegbg.methods.prn.method import Prn
from raysegbg.state.store import PseudoLabelStore
from raysegbg.train import train_worker
from tests.conftest import tiny_overrides
from tests.tb_read import scalar_steps, tags

PRN = {"method.name": "prn", "method.prn.base_epochs": 2, "method.prn.patch_sizes": "[8,16]",
       "optim.name": "sgd", "optim.lr": 0.05}  # fmt: skip


@pytest.fixture(scope="module")
def contrast_data(tmp_path_factory) -> Path:
    """32x32 binary images with spatially varying contrast and illumination (48 images)."""
    from raysegbg.data.synthetic import make_dataset

    out = tmp_path_factory.mktemp("data") / "contrast"
    make_dataset("varying_contrast", out, n=48, size=32, seed=0)
    return out


@pytest.fixture(autouse=True)
def every_checkpoint(monkeypatch):
    """These tests read every stage's checkpoint: keep all of them (a run keeps the two best
    and the newest, `checkpoint.prune_checkpoints`)."""
    monkeypatch.setattr("raysegbg.local.prune_checkpoints", lambda *args: None)


def prn_config(data: Path, root: Path, **extra):
    return load_config(None, tiny_overrides(data, root, **{**PRN, **extra}))


def base_weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state["method"].items() if k.startswith("base.")}


def test_three_stages_in_order_with_labels_in_the_store(contrast_data, tmp_path):
    run = tmp_path / "p"
    cfg = prn_config(contrast_data, tmp_path, **{"logging.name": "p"})
    train_local(cfg, run, log=lambda line: None)
    found = list_checkpoints(run)
    assert [m["epoch"] for _, m in found] == [1, 2, 3, 4, 5]  # base 2, labels 1, refine 2
    assert [folder.name for folder, _ in found] == [f"epoch_{e:04d}" for e in range(1, 6)]
    states = [load_state(folder) for folder, _ in found]
    assert [s["stage"] for s in states] == [0, 0, 1, 2, 2]
    # stage 3 trains the refiner only: the base is the one stage 1 ended with
    for key, value in base_weights(states[1]).items():
        assert torch.equal(value, base_weights(states[-1])[key]), key
    refiner = [k for k in states[-1]["method"] if k.startswith("refiner.") and "weight" in k]
    assert any(not torch.equal(states[2]["method"][k], states[-1]["method"][k]) for k in refiner)
    assert "pseudo/oracle_iou_p8" in found[2][1]["metrics"]
    # after each refine epoch the head best on validation is chosen, and kept in the checkpoint
    chosen = found[-1][1]["metrics"]["refine/chosen_head"]
    assert chosen == -1 and "refine/val_iou_p16" in found[-1][1]["metrics"]  # default: mean
    assert states[-1]["method"]["_extra_state"]["inference_head"] == (
        None if chosen < 0 else chosen
    )
    assert "refine/chosen_head" not in found[0][1]["metrics"]  # not in the base stage

    # the store (persisted and in the checkpoint) holds every held-out image, every head
    store = PseudoLabelStore.load(run / "state" / "labels")
    method = Prn(cfg, 2, 1, 255)
    method.load_state_dict(states[-1]["method"])
    from raysegbg.data.loader import SegDataset

    train = SegDataset(contrast_data, "train")
    held = [i for i in train.ids if in_holdout(i, cfg.method.prn.holdout)]
    assert 0 < len(held) < len(train)
    assert sorted(store.ids()) == sorted(label_key(i, p) for i in held for p in (8, 16))
    # each label is the base probability binarized at its stored per-patch threshold map
    image, mask = train[train.ids.index(held[0])]
    prob = method.eval().base_probability(image[None])[:, 0]
    for patch in (8, 16):
        item = store.get([label_key(held[0], patch)])[0]
        labels, thresholds = patch_pseudo_labels(
            prob, mask[None] == 1, mask[None] != 255, patch, threshold_grid(20)
        )
        np.testing.assert_array_equal(item.mask, labels[0].numpy())
        np.testing.assert_array_equal(item.confidence, thresholds[0].numpy())
        block = item.confidence[:patch, :patch]  # constant inside each patch
        assert np.all(block == block[0, 0])
    assert "pseudo/oracle_iou_image" in found[2][1]["metrics"]  # measured, not stored

    logged = tags(run / "tb")
    assert "prn/base_thresholds_pseudo_refined" in logged["images"]
    assert scalar_steps(run / "tb", "val/miou") == [1, 2, 3, 4, 5]
    assert scalar_steps(run / "tb", "pseudo/oracle_iou_p16") == [3]


def test_resume_inside_a_stage_and_at_a_stage_boundary(contrast_data, tmp_path):
    lines: list[str] = []
    run = tmp_path / "r"
    train_local(prn_config(contrast_data, tmp_path, **{"train.epochs": 1}), run, log=lines.append)
    first = load_state(list_checkpoints(run)[-1][0])
    # more refiner epochs: resumes inside the refine stage with its optimiser state
    train_local(prn_config(contrast_data, tmp_path, **{"train.epochs": 2}), run, log=lines.append)
    assert "resuming at epoch 5 (step" in "\n".join(lines)
    assert [m["epoch"] for _, m in list_checkpoints(run)] == [1, 2, 3, 4, 5]
    # lose everything after stage 1: the labels are made again, the same as before
    for folder, meta in list_checkpoints(run):
        if meta["epoch"] > 2:
            shutil.rmtree(folder)
    shutil.rmtree(run / "state")
    lines.clear()
    train_local(prn_config(contrast_data, tmp_path, **{"train.epochs": 1}), run, log=lines.append)
    assert "resuming at epoch 3" in lines[0] and "[pseudo-labels]" in "\n".join(lines)
    again = load_state(list_checkpoints(run)[-1][0])
    assert again["shared"].keys() == first["shared"].keys()
    for name in first["shared"]:
        if name.endswith(".parquet"):
            assert again["shared"][name] == first["shared"][name]


def test_cross_fit_labels_every_training_image_with_a_base_that_never_saw_it(
    contrast_data, tmp_path
):
    from raysegbg.data.loader import SegDataset

    lines: list[str] = []
    run = tmp_path / "x"
    cfg = prn_config(contrast_data, tmp_path, **{"logging.name": "x", "train.epochs": 1,
                                                "method.prn.base_epochs": 1,
                                                "method.prn.cross_fit": "true"})  # fmt: skip
    train_local(cfg, run, log=lines.append)
    states = [load_state(folder) for folder, _ in list_checkpoints(run)]
    # fold 1: base 1 epoch + labels, fold 2: base 1 + labels, final base 1, refine 1
    assert [s["stage"] for s in states] == [0, 1, 2, 3, 4, 5]
    assert "[fold 2 pseudo-labels]" in "\n".join(lines)

    def weights(state, prefix):
        return {k: v for k, v in state["method"].items() if k.startswith(prefix)}

    def same(a, b):
        return all(torch.equal(v, b[k]) for k, v in a.items())

    # each base trains in its own stage only, and the three end up different
    last = states[-1]
    fold1, fold2, final = "fold_bases.0.", "fold_bases.1.", "base."
    assert same(weights(states[1], fold1), weights(last, fold1))
    assert not same(weights(states[1], fold2), weights(last, fold2))
    assert same(weights(states[3], fold2), weights(last, fold2))
    assert not same(weights(states[3], final), weights(last, final))
    assert same(weights(states[4], final), weights(last, final))

    train = SegDataset(contrast_data, "train")
    held = {i for i in train.ids if in_holdout(i, cfg.method.prn.holdout)}
    assert 0 < len(held) < len(train)
    method = Prn(cfg, 2, 1, 255).eval()
    method.load_state_dict(last["method"])
    stages = method.stages()
    assert {i for i in train.ids if stages[0].keep(i)} == set(train.ids) - held
    assert {i for i in train.ids if stages[2].keep(i)} == held
    assert stages[4].keep is None and stages[5].keep is None  # final base, refiner: all

    # every training image is labeled by the fold base that never trained on it, and that
    # base's logit is the refiner's training input; inference refines the final base
    store = PseudoLabelStore.load(run / "state" / "labels")
    assert sorted(store.ids()) == sorted(label_key(i, p) for i in train.ids for p in (8, 16))
    for image_id in (min(held), min(set(train.ids) - held)):
        image, mask = train[train.ids.index(image_id)]
        method.use_stage("fold 1 pseudo-labels" if image_id in held else "fold 2 base")
        prob = method.base_probability(image[None])
        fold = method.fold_bases[0 if image_id in held else 1]
        assert torch.equal(method.predict(image[None]), fold(image[None]))
        labels, _ = patch_pseudo_labels(
            prob[:, 0], mask[None] == 1, mask[None] != 255, 8, threshold_grid(20)
        )
        np.testing.assert_array_equal(store.get([label_key(image_id, 8)])[0].mask, labels[0])
        method.use_stage("refine")
        torch.testing.assert_close(method.base_logit(image[None], [image_id]).sigmoid(), prob)
        assert not torch.allclose(method.base_probability(image[None]), prob)
    both = [min(held), min(set(train.ids) - held)]  # a batch mixing the folds
    images = torch.stack([train[train.ids.index(i)][0] for i in both])
    mixed = method.base_logit(images, both)
    for j, image_id in enumerate(both):
        torch.testing.assert_close(
            mixed[j : j + 1], method.base_logit(images[j : j + 1], [image_id])
        )


def test_refine_augment_searches_labels_per_batch_and_bias_augment_keeps_the_stored_ones(
    contrast_data, tmp_path
):
    from dataclasses import replace
    from types import SimpleNamespace

    from raysegbg.data.loader import SegDataset, eval_batches
    from raysegbg.state.actor import SharedState
    from raysegbg.state.client import LocalStateClient

    run = tmp_path / "a"
    cfg = prn_config(contrast_data, tmp_path, **{"logging.name": "a", "train.epochs": 1,
                                                "method.prn.refine_augment": "true"})  # fmt: skip
    train_local(cfg, run, log=lambda line: None)
    method = Prn(cfg, 2, 1, 255).eval()
    method.load_state_dict(load_state(list_checkpoints(run)[-1][0])["method"])
    stages = method.stages()
    assert stages[-1].augment and not stages[1].augment  # the labels are of whole images
    assert "prn/base_thresholds_pseudo_refined" in tags(run / "tb")["images"]

    # on unaugmented held-out images the per-batch search finds what the store holds
    train = SegDataset(contrast_data, "train")
    held = train.subset(lambda i: in_holdout(i, cfg.method.prn.holdout))
    served = LocalStateClient(SharedState(str(run / "state")))  # the run's store, reloaded
    method.run = SimpleNamespace(state=served)
    batch = next(iter(eval_batches(held, 8)))
    prob = method.base_probability(batch.images)
    live, live_map = method._targets(batch, prob)
    method.params = replace(method.params, refine_augment=False)
    stored, stored_map = method._targets(batch, prob)
    assert all(torch.equal(live[p], stored[p]) for p in (8, 16))
    assert torch.equal(live_map, stored_map) and live_map.unique().numel() > 1
    # on a flipped batch they follow the base's output on the flipped images, not the store
    method.params = replace(method.params, refine_augment=True)
    flipped = Batch(batch.images.flip(-1), batch.masks.flip(-1), batch.ids)
    prob = method.base_probability(flipped.images)
    labels, _ = method._targets(flipped, prob)
    expected, _ = patch_pseudo_labels(
        prob[:, 0], flipped.masks == 1, flipped.masks != 255, 8, threshold_grid(20)
    )
    assert torch.equal(labels[8], expected.long())

    # bias_augment: the refiner's training input is the base logit plus a seeded offset, one
    # draw per largest patch (16 px) plus one per image; the labels stay the stored ones, which
    # are still a per-patch threshold binarization of the shifted probability
    method.train()
    method.params = replace(method.params, refine_augment=False, bias_augment=1.0)
    info = StepInfo(step=7, epoch=0, lr_scale=1.0)
    offset = method._bias(batch, info)
    assert offset.shape == prob.shape and offset.std() > 0.3
    tiles = offset.unfold(2, 16, 16).unfold(3, 16, 16)  # (B, 1, 2, 2, 16, 16)
    assert torch.equal(tiles, tiles[..., :1, :1].expand_as(tiles))  # constant per patch
    assert tiles[..., 0, 0].flatten(1).unique(dim=1).shape[1] > 1  # varies between patches
    assert torch.equal(offset, method._bias(batch, info))  # seeded by (seed, step, image id)
    swapped = Batch(batch.images.flip(0), batch.masks.flip(0), batch.ids[::-1])
    assert torch.equal(offset.flip(0), method._bias(swapped, info))
    assert not torch.equal(offset, method._bias(batch, StepInfo(8, 0, 1.0)))
    method.params = replace(method.params, bias_augment=2.0)
    torch.testing.assert_close(method._bias(batch, info), 2 * offset)
    method.params = replace(method.params, bias_augment=1.0)
    method(batch, info)
    shifted = (method.base_logit(batch.images) + offset).sigmoid()[:4, 0]
    torch.testing.assert_close(method.shown["base"], shifted)
    assert torch.equal(method.shown["pseudo"], stored[8][:4])
    for image in range(min(4, len(batch.ids))):
        for y in range(0, 32, 8):
            for x in range(0, 32, 8):
                q = shifted[image, y : y + 8, x : x + 8]
                label = stored[8][image, y : y + 8, x : x + 8]
                if 0 < label.sum() < label.numel():  # the 1s are the highest probabilities
                    assert q[label == 1].min() >= q[label == 0].max()


def test_base_checkpoint_replaces_stage_one(contrast_data, tmp_path):
    baseline = tiny_overrides(contrast_data, tmp_path, **{"logging.name": "b", "train.epochs": 1})
    train_local(load_config(None, baseline), tmp_path / "b", log=lambda line: None)
    cfg = prn_config(contrast_data, tmp_path, **{"method.prn.base_checkpoint": tmp_path / "b",
                                                "train.epochs": 1})  # fmt: skip
    train_local(cfg, tmp_path / "p", log=lambda line: None)
    found = list_checkpoints(tmp_path / "p")
    assert [m["epoch"] for _, m in found] == [1, 2, 3]  # load base, labels, refine 1
    net = load_state(list_checkpoints(tmp_path / "b")[-1][0])["method"]
    got = base_weights(load_state(found[0][0]))
    assert got and all(torch.equal(v, net["net." + k[5:]]) for k, v in got.items())

    fresh = Prn(cfg, 2, 1, 255)  # the same run folder as an object-store URI
    fresh._load_base(f"file://{tmp_path / 'b'}")
    assert all(torch.equal(v, net["net." + k]) for k, v in fresh.base.state_dict().items())


def test_refuses_a_multiclass_dataset_and_a_bad_base_checkpoint(tmp_path):
    cfg = load_config(None, ["method.name=prn", "model.encoder_depth=3",
                             "model.decoder_channels=[16,8,8]"])  # fmt: skip
    with pytest.raises(RaysegbgError, match="prn refines binary segmentation.*3 classes"):
        Prn(cfg, 3, 3, 255)
    method = Prn(cfg, 2, 3, 255)
    other = Prn(load_config(None, ["method.name=prn"]), 2, 3, 255)  # a different base model
    from raysegbg.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "c", {"method": other.state_dict()}, {"epoch": 1})
    with pytest.raises(RaysegbgError, match="does not fit the base model"):
        method._load_base(str(tmp_path / "c"))
    with pytest.raises(RaysegbgError, match="patch_sizes must all be >= 2"):
        load_config(None, ["method.prn.patch_sizes=[1]"])
    for bad in ("abc", "(unclosed"):
        with pytest.raises(RaysegbgError, match="holdout_group .* is not a regular expression"):
            load_config(None, [f"method.prn.holdout_group={bad}"])
    with pytest.raises(RaysegbgError, match="bias_augment must be >= 0"):
        load_config(None, ["method.prn.bias_augment=-1"])
    with pytest.raises(RaysegbgError, match="cross_fit trains its own bases"):
        load_config(None, ["method.prn.cross_fit=true", "method.prn.base_checkpoint=/x"])
    with pytest.raises(RaysegbgError, match="cross_fit needs method.prn.holdout > 0"):
        load_config(None, ["method.prn.cross_fit=true", "method.prn.holdout=0"])


def test_inference_averages_the_heads_and_predicts_like_its_stage():
    cfg = load_config(None, ["method.name=prn", "model.encoder_depth=3",
                             "model.decoder_channels=[16,8,8]"])  # fmt: skip
    torch.manual_seed(0)
    method = Prn(cfg, 2, 1, 255).eval()
    images = torch.randn(2, 1, 32, 32)
    assert torch.equal(method.predict(images), method.base(images))  # before stage 3
    method.use_stage("refine")
    logits = method.predict(images)
    q = method.refined_probability(images)
    heads, prob = method.refiner_logits(images)
    assert set(heads) == {0, 8, 16}
    base = method.base_logit(images)  # a fresh residual refiner starts as the base
    assert all(torch.equal(v, base) for v in heads.values())
    torch.testing.assert_close(prob, method.base_probability(images))
    torch.testing.assert_close(prob, method.base(images).softmax(1)[:, 1:])
    torch.testing.assert_close(q, torch.stack([v.sigmoid() for v in heads.values()]).mean(0))
    assert torch.equal(logits.argmax(1), (q[:, 0] > 0.5).long())
    # the stage travels with the weights
    copy = Prn(cfg, 2, 1, 255)
    copy.load_state_dict(method.state_dict())
    assert copy.stage.name == "refine"


def test_threshold_heads_binarize_the_base_at_each_patch_threshold(monkeypatch):
    """Head t8 predicts a threshold per 8x8 patch and binarizes the base probability with it:
    scored at the searched optimum it reproduces the pseudo-labels, and its loss is one minus
    the pixel-weighted patch IoU, which the optimum minimises."""
    cfg = load_config(None, ["method.name=prn", "model.encoder_depth=3",
                             "model.decoder_channels=[16,8,8]", "method.prn.patch_sizes=[8]",
                             "method.prn.threshold_heads=true"])  # fmt: skip
    torch.manual_seed(0)
    method = Prn(cfg, 2, 1, 255).eval()
    method.use_stage("refine")
    images = 3 * torch.randn(2, 1, 32, 32)
    masks = (torch.rand(2, 32, 32) > 0.5).long()
    masks[0, :4, :4] = 255
    prob = method.base_probability(images)
    valid, fg, grid = masks != 255, masks == 1, threshold_grid(20)
    logits, scores, _ = method._refine(images)
    assert set(logits) == {0, 8, -8} and scores[8].shape == (2, 20, 4, 4)
    assert torch.equal(logits[-8], method.base_logit(images))  # a fresh head picks 0.5

    labels, thresholds = patch_pseudo_labels(prob[:, 0], fg, valid, 8, grid)
    best = (thresholds[:, ::8, ::8] * 20).round().long() - 1  # (2, 4, 4) grid index
    oracle = 50 * torch.nn.functional.one_hot(best, 20).permute(0, 3, 1, 2).float()
    monkeypatch.setattr(method.refiner.thresholds["8"], "forward", lambda feats: oracle)
    logits, scores, _ = method._refine(images)
    assert ((logits[-8][:, 0] >= 0) != labels.bool()).float().mean() < 1e-3

    # loss at the optimum: 1 - sum(weight * best IoU) / sum(weight), weight = the patch's
    # largest union (at the lowest threshold), counted directly
    table = patch_iou_table(prob[:, 0], fg, valid, 8, grid)
    widest = ((prob[:, 0] >= grid[0]) | fg) & valid
    weight = widest.float().view(2, 4, 8, 4, 8).sum((2, 4))
    expected = 1 - (weight * table.amax(-1)).sum() / weight.sum()
    loss = method.threshold_loss(prob, masks, 8, oracle)
    torch.testing.assert_close(loss, expected.float())
    uniform = torch.zeros_like(oracle, requires_grad=True)
    worse = method.threshold_loss(prob, masks, 8, uniform)
    assert worse > loss
    worse.backward()  # descending the loss moves mass toward the optimal thresholds
    step = (-uniform.grad).softmax(1).argmax(1)
    assert table.gather(-1, step[..., None]).mean() > table.mean()


def whole_run(rank: int, world: int, overrides: list[str], run_dir: str, address: str,
              actor: str):  # fmt: skip
    """A full 3-stage run on one rank of a gloo group; every rank reaches the run's shared
    state actor on the session's Ray, as a Ray Train worker does."""
    import ray

    from raysegbg.local import LocalHost
    from raysegbg.state.actor import lookup
    from raysegbg.state.client import StateClient

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        cfg = load_config(None, overrides)
        host = LocalHost(Path(run_dir))
        state = StateClient(lookup(actor), cfg.train.snapshot_every, rank)
        ctx = host.context(rank=rank, world_size=world, state=state, log=lambda line: None)
        if rank:
            ctx.report = lambda metrics, checkpoint, name: None
        train_worker(cfg, ctx)
        return load_state(list_checkpoints(Path(run_dir))[-1][0]) if rank == 0 else None
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_two_workers_make_the_labels_and_refiner_of_one(ray_local, contrast_data, tmp_path):
    """Each rank puts its own share of the labels in the state actor and reads its own
    batches' labels from it (no gather to rank 0, no broadcast)."""
    from raysegbg.state import actor as state_actor
    from tests.multiproc import run_ranks

    overrides = [*tiny_overrides(contrast_data, tmp_path, **PRN), "train.epochs=1",
                 "method.prn.base_epochs=1"]  # fmt: skip
    address = ray_local.get_runtime_context().gcs_address
    runs = {}
    for name, world in (("one", 1), ("two", 2)):
        actor = state_actor.unique_name(f"prn-{name}")
        handle = state_actor.create(actor, tmp_path / name / "state")  # noqa: F841 (alive)
        runs[name] = run_ranks(whole_run, world, overrides, str(tmp_path / name), address, actor)
        state_actor.destroy(actor)
    (single,), pair = runs["one"], runs["two"]
    one = PseudoLabelStore.load(tmp_path / "one" / "state" / "labels")
    two = PseudoLabelStore.load(tmp_path / "two" / "state" / "labels")
    assert sorted(one.ids()) == sorted(two.ids())
    agree = np.mean(
        [
            np.mean(a.mask == b.mask)
            for a, b in zip(one.get(one.ids()), two.get(one.ids()), strict=True)
        ]
    )
    assert agree > 0.999
    for key, value in single["method"].items():
        if key.startswith("refiner.") and value.is_floating_point():
            torch.testing.assert_close(pair[0]["method"][key], value, atol=1e-4, rtol=1e-3)


def test_validation_picks_the_best_head_and_mean_mode_keeps_averaging(monkeypatch):
    torch.manual_seed(0)
    masks = (torch.rand(2, 32, 32) > 0.6).long()
    images = torch.randn(2, 1, 32, 32)
    truth = masks[:, None].float() * 20 - 10  # logit +10 on the foreground, -10 elsewhere

    def fake_logits(_images):  # head 8 is right, the global head wrong, head 16 undecided
        return {0: -truth, 8: truth, 16: torch.zeros_like(truth)}, truth.sigmoid()

    batches = lambda: iter([Batch(images, masks, ["a", "b"])])  # noqa: E731
    for mode, expected in (("best", 8), ("mean", None)):
        cfg = load_config(None, ["method.name=prn", "model.encoder_depth=3",
                                 "model.decoder_channels=[16,8,8]",
                                 f"method.prn.inference={mode}"])  # fmt: skip
        method = Prn(cfg, 2, 1, 255).train()
        method.use_stage("refine")
        monkeypatch.setattr(method, "refiner_logits", fake_logits)
        out = method.after_epoch(batches)
        assert method.inference_head == expected
        if mode == "best":
            assert out["refine/chosen_head"] == 8 and out["refine/val_iou_p8"] == 1.0
            assert out["refine/val_iou_image"] == 0.0 and method.training
            assert torch.equal(method.predict(images).argmax(1), masks)
        else:
            assert out["refine/chosen_head"] == -1 and out["refine/val_iou_p8"] == 1.0
    method.use_stage("base")  # nothing is chosen outside the refine stage
    assert method.after_epoch(batches) == {}


def test_base_from_a_baseline_run_is_its_best_checkpoint_whatever_its_name(tmp_path):
    from raysegbg.checkpoint import save_checkpoint
    from raysegbg.config import save_config
    from raysegbg.methods.baseline.method import Baseline

    tiny = ["model.encoder_depth=3", "model.decoder_channels=[16,8,8]"]
    baseline_cfg = load_config(None, [*tiny, "logging.name=prn-base"])  # a misleading name
    run = tmp_path / "prn-base"
    run.mkdir()
    save_config(baseline_cfg, run / "config.yaml")
    nets = []
    for epoch, miou in ((1, 0.9), (2, 0.5)):  # the best is the first, not the last
        torch.manual_seed(epoch)
        nets.append(Baseline(baseline_cfg, 2, 1, 255))
        meta = {"epoch": epoch, "metrics": {"val/miou": miou}}
        save_checkpoint(run / f"epoch_{epoch:04d}", {"method": nets[-1].state_dict()}, meta)
    method = Prn(load_config(None, [*tiny, "method.name=prn"]), 2, 1, 255)
    method._load_base(str(run))
    best = nets[0].state_dict()
    assert all(torch.equal(v, best["net." + k]) for k, v in method.base.state_dict().items())
