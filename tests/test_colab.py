"""CoLab: the exact hypergradient, the soft targets, inference collapsing contexts."""

import torch

from raysegbg.config import load_config
from raysegbg.methods.base import Batch
from raysegbg.methods.colab.method import Colab, collapse, distance_from_foreground, soft_targets
from raysegbg.step import StepRunner

TINY = ["model.encoder_depth=3", "model.decoder_channels=[16,8,8]", "method.name=colab",
        "method.colab.k=3", "method.colab.generator_depth=3"]  # fmt: skip


def make(num_classes: int = 2) -> Colab:
    torch.manual_seed(0)
    return Colab(load_config(None, TINY), num_classes, 3, 255)


def test_hypergradient_matches_finite_differences():
    method = make().double()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    masks = (torch.rand(2, 16, 16, generator=gen) > 0.6).long()
    method.train()
    _, grads = method.hypergradient(images, masks, images, masks)
    direction = [
        torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in method.generator_params
    ]
    analytic = sum((g * u).sum() for g, u in zip(grads, direction, strict=True)).item()

    # the loss is sharply curved (BatchNorm over a few pixels): a small step in float64
    eps = 1e-8

    def meta_at(sign: float) -> float:
        with torch.no_grad():
            for p, u in zip(method.generator_params, direction, strict=True):
                p.add_(sign * eps * u)
        meta, _ = method.hypergradient(images, masks, images, masks)
        with torch.no_grad():
            for p, u in zip(method.generator_params, direction, strict=True):
                p.sub_(sign * eps * u)
        return meta.item()

    numeric = (meta_at(+1) - meta_at(-1)) / (2 * eps)
    assert abs(analytic) > 1e-6
    assert abs(analytic - numeric) <= 1e-5 * abs(numeric), (analytic, numeric)


def test_foreground_never_gets_a_context_label():
    context = torch.softmax(torch.randn(2, 3, 8, 8), 1)
    masks = torch.randint(0, 3, (2, 8, 8))
    masks[0, 0, 0] = 255
    targets, k = soft_targets(context, masks, num_classes=3, ignore=255)
    assert targets.shape == (2, 3 + 2, 8, 8)
    fg = (masks > 0) & (masks != 255)
    assert torch.all(targets[:, :k].permute(0, 2, 3, 1)[fg] == 0)  # no context on foreground
    torch.testing.assert_close(
        targets[:, :k].sum(1)[masks == 0], torch.ones(int((masks == 0).sum()))
    )
    assert torch.all(targets[0, :, 0, 0] == 0)  # ignored pixel: no target at all
    assert torch.all(targets[:, k:].argmax(1)[fg] + 1 == masks[fg])


def test_inference_maps_every_context_channel_to_background():
    logits = torch.full((1, 3 + 1, 1, 3), -10.0)
    for pixel, channel in enumerate((0, 1, 2)):  # each pixel wins on one context channel
        logits[0, channel, 0, pixel] = 5.0
    assert collapse(logits, 3).argmax(1).tolist() == [[[0, 0, 0]]]
    method = make().eval()
    out = method.predict(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 2, 32, 32)  # class logits, not K + foreground channels


def runner_for(method: Colab) -> StepRunner:
    """The loop's optimisers for the method's (only) stage, as the training loop builds them."""
    cfg = method.cfg
    return StepRunner(method.optimizers(method.stages()[0]), cfg.optim, torch.device("cpu"), None)


def test_meta_update_changes_the_generator_and_frozen_control_does_not():
    batch = Batch(torch.randn(2, 3, 32, 32), (torch.rand(2, 32, 32) > 0.7).long(), ["a", "b"])
    for update, changes in ((True, True), (False, False)):
        cfg = load_config(None, TINY + [f"method.colab.meta_update={str(update).lower()}"])
        torch.manual_seed(0)
        method = Colab(cfg, 2, 3, 255).train()
        before = [p.clone() for p in method.generator_params]
        net_before = [p.clone() for p in method.net.parameters() if p.requires_grad]
        runner = runner_for(method)
        losses = method.training_step(batch, runner)
        moved = any(
            not torch.equal(a, b) for a, b in zip(before, method.generator_params, strict=True)
        )
        assert moved == changes and (("meta_roi_loss" in runner.logged) == changes)
        assert set(losses) >= {"soft_ce", "loss"}
        net_after = [p for p in method.net.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(net_before, net_after, strict=True))


def test_distance_from_foreground():
    masks = torch.zeros(1, 7, 7, dtype=torch.long)
    masks[0, 3, 3] = 1
    d = distance_from_foreground(masks, 5)
    assert d[0, 3, 3] == 0 and d[0, 3, 5] == 2 and d[0, 0, 0] == 3


def two_meta_steps(rank: int, world: int, overrides: list[str]) -> list[torch.Tensor]:
    from pathlib import Path

    from raysegbg.train import Trainer, WorkerContext

    trainer = Trainer(
        load_config(None, overrides), WorkerContext(run_dir=Path("u"), rank=rank, world_size=world)
    )
    before = [p.clone() for p in trainer.method.generator_params]
    for k, batch in enumerate(trainer.loader.epoch(0)):
        trainer.train_step(batch)  # meta-update first (update_interval=1), then the DDP step
        if k == 1:
            break
    after = trainer.method.generator_params
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    return [p.detach().clone() for p in after]


def test_under_ddp_the_generator_stays_identical_on_every_rank(tiny_data, tmp_path):
    """Global BatchNorm swaps the generator's BN layers after init; the meta-step must use
    the swapped parameters, and hand-averaged gradients keep the ranks in step."""
    from tests.conftest import tiny_overrides
    from tests.multiproc import run_ranks

    overrides = tiny_overrides(tiny_data, tmp_path) + TINY[2:] + ["method.colab.update_interval=1"]
    pair = run_ranks(two_meta_steps, 2, overrides)
    for a, b in zip(pair[0], pair[1], strict=True):
        torch.testing.assert_close(a, b)


def test_meta_batch_from_a_holdout_the_network_never_trains_on(tiny_data, tmp_path):
    from pathlib import Path

    from raysegbg.data.loader import in_holdout
    from raysegbg.train import Trainer, WorkerContext
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(tiny_data, tmp_path) + TINY[2:] + [
        "method.colab.update_interval=1", "method.colab.meta_batch=holdout",
        "method.colab.meta_holdout=0.3"]  # fmt: skip

    def meta_ids(steps: int) -> tuple[list[list[str]], set[str]]:
        trainer = Trainer(load_config(None, overrides), WorkerContext(run_dir=Path("u")))
        method, passed = trainer.method, []
        meta_loss = method.meta_loss

        def spy(images, masks, meta_images, meta_masks):  # what the meta-step measures on
            passed.append(meta_images)
            return meta_loss(images, masks, meta_images, meta_masks)

        method.meta_loss = spy
        seen, trained = [], set()
        for k, batch in enumerate(trainer.loader.epoch(0)):
            if k == steps:
                break
            trained |= set(batch.ids)
            trainer.train_step(batch)
            meta = method.meta_loader.batch_at(k)  # update_interval=1: update k reads batch k
            assert torch.equal(passed[k], meta.images)
            seen.append(meta.ids)
        assert not any(in_holdout(i, 0.3) for i in trainer.stage_ds.ids)
        return seen, trained

    seen, trained = meta_ids(3)
    held = {i for ids in seen for i in ids}
    assert held and all(in_holdout(i, 0.3) for i in held) and not held & trained
    assert len(seen[0]) == 8 and seen[0] != seen[1]  # one global batch per meta-update
    assert meta_ids(3)[0] == seen  # a function of the step: a resumed run draws the same
