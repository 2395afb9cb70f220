"""MCIBI: the memory update rule, the consistency loss, the feature stride, and 2 workers ==
1 worker."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raysegbg.config import load_config
from raysegbg.errors import RaysegbgError
from raysegbg.methods.base import Batch, StepInfo
from raysegbg.methods.mcibi.method import Mcibi, auto_stride
from raysegbg.train import Trainer, WorkerContext
from tests.conftest import tiny_overrides
from tests.multiproc import run_ranks

SMALL = ["model.encoder_depth=3", "model.decoder_channels=[32,16,8]", "method.name=mcibi",
         "method.mcibi.dims=8", "method.mcibi.attention_dims=4"]  # fmt: skip


def make(num_classes: int = 3) -> Mcibi:
    torch.manual_seed(0)
    return Mcibi(load_config(None, SMALL), num_classes, 3, 255)


def test_update_rule_matches_direct_computation():
    method = make()
    mem = method.memory
    mem.memory[0] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])
    mem.filled[0] = True
    feats = torch.randn(1, 8, 2, 2)
    masks = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 0, 0], [255, 255, 0, 0]]])
    method.update_memory(feats, masks, momentum=0.3)
    # direct: labels at feature resolution (2x2), class 0 weighted by 1 - cos, class 1 plain mean
    # feature pixels (row-major): class 0, class 1, ignored, class 0
    flat = feats.permute(0, 2, 3, 1).reshape(-1, 8)
    old0 = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])
    w = torch.tensor([1 - F.cosine_similarity(flat[i], old0, dim=0) for i in (0, 3)])
    mean0 = (w[0] * flat[0] + w[1] * flat[3]) / w.sum()
    torch.testing.assert_close(mem.memory[0], 0.7 * old0 + 0.3 * mean0)
    torch.testing.assert_close(mem.memory[1], flat[1])  # empty entry: the first mean as is
    assert mem.filled.tolist() == [True, True, False]


def test_feature_stride_is_explicit_or_leaves_32x32_positions_on_a_training_crop():
    assert [auto_stride(n, n) for n in (16, 32, 64, 96, 512)] == [1, 1, 2, 4, 16]
    assert auto_stride(64, 32) == 2  # 32 x 16 = 512 positions
    images = torch.randn(2, 3, 64, 64)

    def side(*extra: str) -> int:
        method = Mcibi(load_config(None, [*SMALL, *extra]), 3, 3, 255).eval()
        return method.features(images).shape[-1]

    assert side("data.crop_size=64") == 32  # auto: 1/2 of a 64-px crop
    assert side("data.crop_size=128") == 16  # the run's stride follows its crops, not the input
    assert side("data.crop_size=0") == 32  # no crops: from the input itself
    assert side("data.crop_size=64", "method.mcibi.feature_stride=4") == 16
    with pytest.raises(RaysegbgError, match="feature_stride must be >= 0"):
        load_config(None, ["method.mcibi.feature_stride=-1"])


def test_consistency_loss_is_ce_of_filled_entries_through_stage2():
    method = make()
    method.memory.memory.copy_(torch.randn(3, 8))
    method.memory.filled.copy_(torch.tensor([True, False, True]))
    logits = method.stage2(method.memory.memory[:, :, None, None])[:, :, 0, 0]
    expected = (F.cross_entropy(logits[0:1], torch.tensor([0]))
                + F.cross_entropy(logits[2:3], torch.tensor([2]))) / 2  # fmt: skip
    torch.testing.assert_close(method.consistency_loss(), expected)
    loss = method.consistency_loss()
    loss.backward()
    assert method.stage2.weight.grad.abs().sum() > 0  # it trains the stage-2 classifier


def test_inference_reads_but_never_writes_the_memory():
    method = make().eval()
    before = method.memory.memory.clone()
    logits = method.predict(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3, 32, 32) and torch.equal(method.memory.memory, before)
    method.train()
    batch = Batch(torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32)), [])
    out = method(batch, StepInfo(0, 0, 1.0))
    assert set(out) == {"stage1", "stage2", "consistency", "loss"}
    assert torch.equal(method.memory.memory, before)  # the update comes after the step
    method.after_step(batch, StepInfo(0, 0, 1.0))
    assert not torch.equal(method.memory.memory, before)


def three_steps(rank: int, world: int, overrides: list[str]) -> list[torch.Tensor]:
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, WorkerContext(run_dir=Path("unused"), rank=rank, world_size=world))
    memories = []
    for k, batch in enumerate(trainer.loader.epoch(0)):
        trainer.train_step(batch)
        memories.append(trainer.method.memory.memory.clone())
        if k == 2:
            break
    return memories


def test_two_workers_keep_the_same_memory_as_one(tiny_data, tmp_path):
    # SGD: Adam turns float noise in (mathematically) zero gradients into +-lr steps
    overrides = tiny_overrides(tiny_data, tmp_path) + SMALL[2:] + ["optim.name=sgd"]
    (single,) = run_ranks(three_steps, 1, overrides)
    pair = run_ranks(three_steps, 2, overrides)
    for rank in (0, 1):
        # the first update is the same to float precision (~1e-6 here); later steps train the
        # network too, which amplifies that noise (~1e-4 after three steps), while an update
        # from one rank's pixels alone would be off by ~1e-1
        torch.testing.assert_close(pair[rank][0], single[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(pair[rank][-1], single[-1], atol=1e-3, rtol=1e-3)
