"""Feature memories: W workers equal one worker; a class seen on one rank gets its full update."""

import torch

from raysegbg.state.memory import ClassMemory, RingBank, class_sums
from tests.multiproc import run_ranks

CLASSES, DIMS, STEPS, GLOBAL_N = 5, 8, 20, 48


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    feats = torch.randn(GLOBAL_N, DIMS, generator=gen)
    labels = torch.randint(0, CLASSES, (GLOBAL_N,), generator=gen)
    labels[torch.rand(GLOBAL_N, generator=gen) < 0.1] = 255  # some ignored pixels
    return feats, labels


def run_memory(rank: int, world: int) -> dict:
    memory, bank = ClassMemory(CLASSES, DIMS), RingBank(30, DIMS)
    share = GLOBAL_N // world
    for step in range(STEPS):
        feats, labels = global_batch(step)
        mine = slice(rank * share, (rank + 1) * share)
        memory.update_from(feats[mine], labels[mine], momentum=0.1)
        keep = labels[mine] != 255
        bank.push(feats[mine][keep][: 3 + rank], labels[mine][keep][: 3 + rank])  # uneven
    return {"memory": memory.memory.clone(), "bank": bank.bank.clone(), "labels": bank.labels}


def test_two_workers_keep_the_same_memory_as_one():
    (single,) = run_ranks(run_memory, 1)
    pair = run_ranks(run_memory, 2)
    for rank in (0, 1):
        torch.testing.assert_close(pair[rank]["memory"], single["memory"], atol=1e-5, rtol=0)
    # the bank is filled in rank order: identical on every rank
    assert torch.equal(pair[0]["bank"], pair[1]["bank"])
    assert torch.equal(pair[0]["labels"], pair[1]["labels"])


def one_rank_class(rank: int, world: int) -> torch.Tensor:
    """Class 2 appears only in rank 1's pixels."""
    memory = ClassMemory(3, 2)
    memory.memory[2] = torch.tensor([0.0, 0.0])
    memory.filled[2] = True
    if rank == 0:
        feats, labels = torch.tensor([[1.0, 1.0]]), torch.tensor([0])
    else:
        feats, labels = torch.tensor([[4.0, 8.0]]), torch.tensor([2])
    memory.update_from(feats, labels, momentum=0.5)
    return memory.memory[2].clone()


def test_a_class_on_one_rank_gets_its_full_update():
    entry = run_ranks(one_rank_class, 2)
    expected = torch.tensor([2.0, 4.0])  # 0.5 * 0 + 0.5 * (4, 8): the whole update
    for rank in (0, 1):
        torch.testing.assert_close(entry[rank], expected)
    # what averaging two local updates would give instead: half of it
    local_on_rank1 = 0.5 * torch.tensor([4.0, 8.0])
    assert not torch.allclose((torch.zeros(2) + local_on_rank1) / 2, expected)


def test_update_rule_against_direct_computation():
    memory = ClassMemory(3, 2)
    feats = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1])
    memory.update_from(feats, labels, momentum=0.25)  # first fill: the mean itself
    torch.testing.assert_close(memory.memory[0], torch.tensor([2.0, 1.0]))
    assert memory.filled.tolist() == [True, True, False]
    memory.update_from(torch.tensor([[6.0, 5.0]]), torch.tensor([0]), momentum=0.25)
    torch.testing.assert_close(
        memory.memory[0], 0.75 * torch.tensor([2.0, 1.0]) + 0.25 * torch.tensor([6.0, 5.0])
    )
    torch.testing.assert_close(memory.memory[1], torch.tensor([5.0, 5.0]))  # untouched
    assert int(memory.version) == 2


def test_class_sums_respects_weights_and_ignore():
    sums, totals = class_sums(
        torch.tensor([[1.0], [2.0], [4.0]]),
        torch.tensor([1, 1, 255]),
        2,
        torch.tensor([1.0, 3.0, 9.0]),
    )
    assert sums[1].item() == 7.0 and totals.tolist() == [0.0, 4.0]


def test_ring_bank_wraps_in_order():
    bank = RingBank(4, 1)
    bank.push(torch.arange(3.0)[:, None])
    bank.push(torch.arange(3.0, 6.0)[:, None])
    assert bank.bank[:, 0].tolist() == [4.0, 5.0, 2.0, 3.0] and int(bank.count) == 4
