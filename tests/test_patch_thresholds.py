"""The vectorized patch-threshold search equals a brute-force loop, and never loses to 0.5."""

import itertools

import numpy as np
import pytest
import torch

from raysegbg.methods.patch_thresholds import (
    WHOLE_IMAGE,
    patch_iou_table,
    patch_pseudo_labels,
    threshold_grid,
)


def sample(b: int, h: int, w: int, seed: int):
    """Probabilities (some exactly on the grid, to test `>=`), truth, and ignored pixels."""
    rng = np.random.default_rng(seed)
    prob = rng.random((b, h, w)).astype(np.float32)
    on_grid = rng.random((b, h, w)) < 0.2
    prob[on_grid] = rng.integers(1, 21, on_grid.sum()) / 20
    truth = rng.random((b, h, w)) < 0.3 + 0.4 * prob  # correlated, so thresholds differ
    valid = rng.random((b, h, w)) > 0.1
    return torch.from_numpy(prob), torch.from_numpy(truth), torch.from_numpy(valid)


def brute_force(prob, truth, valid, patch: int, steps: int = 20):
    """Loop over images, patches and thresholds; ties go to the threshold nearest 0.5."""
    prob, truth, valid = prob.numpy().astype(np.float64), truth.numpy(), valid.numpy()
    b, h, w = prob.shape
    ph, pw = (h, w) if patch == WHOLE_IMAGE else (patch, patch)
    grid = [k / steps for k in range(1, steps + 1)]
    thresholds = np.zeros((b, h, w))
    for n, top, left in itertools.product(range(b), range(0, h, ph), range(0, w, pw)):
        window = (n, slice(top, top + ph), slice(left, left + pw))
        p, g, v = prob[window], truth[window] & valid[window], valid[window]
        best, best_t = -1.0, None
        for t in grid:
            pred = (p >= t) & v
            union = (pred | g).sum()
            iou = (pred & g).sum() / union if union else 1.0
            if iou > best or (iou == best and abs(t - 0.5) < abs(best_t - 0.5)):
                best, best_t = iou, t
        thresholds[window] = best_t
    return (prob >= thresholds).astype(np.uint8), thresholds


@pytest.mark.parametrize(
    ("shape", "patch"),
    [((3, 16, 16), 4), ((2, 20, 28), 8), ((2, 20, 28), WHOLE_IMAGE), ((2, 20, 28), 32),
     ((1, 17, 9), 5)],
)  # fmt: skip
def test_vectorized_search_equals_brute_force(shape, patch):
    prob, truth, valid = sample(*shape, seed=sum(shape) + patch)
    labels, thresholds = patch_pseudo_labels(prob, truth, valid, patch, threshold_grid(20))
    want_labels, want_thresholds = brute_force(prob, truth, valid, patch)
    np.testing.assert_allclose(thresholds.numpy(), want_thresholds, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(labels.numpy(), want_labels)


@pytest.mark.parametrize("patch", [4, 8, 12, WHOLE_IMAGE])
def test_every_patch_iou_is_at_least_the_one_at_half(patch):
    prob, truth, valid = sample(4, 24, 24, seed=patch)
    grid = threshold_grid(20)
    table = patch_iou_table(prob, truth, valid, patch, grid)  # (B, gh, gw, T)
    labels, thresholds = patch_pseudo_labels(prob, truth, valid, patch, grid)
    at_half = table[..., 9]  # grid[9] == 0.5
    assert grid[9] == 0.5
    # the IoU the pseudo-label reaches in each patch, measured directly on its pixels
    label_iou = patch_iou_table(labels.double(), truth, valid, patch, grid)[..., 0]
    assert (label_iou >= at_half - 1e-12).all()
    assert (label_iou > at_half + 1e-6).any()  # and strictly better somewhere
    used = np.unique(thresholds.numpy())
    assert np.isclose(used[:, None], grid.numpy()[None]).any(1).all()  # only grid values


def test_empty_patches_get_iou_one_and_keep_half():
    prob = torch.full((1, 8, 8), 0.3)
    truth = torch.zeros(1, 8, 8, dtype=torch.bool)
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    table = patch_iou_table(prob, truth, valid, 4, threshold_grid(20))
    # thresholds above 0.3 predict nothing in a patch with no truth: IoU 1 (both empty)
    assert torch.equal(table[..., 6:], torch.ones_like(table[..., 6:]))
    assert torch.equal(table[..., :6], torch.zeros_like(table[..., :6]))
    labels, thresholds = patch_pseudo_labels(prob, truth, valid, 4, threshold_grid(20))
    assert labels.sum() == 0 and torch.all(thresholds == 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_search_on_gpu_matches_cpu():
    prob, truth, valid = sample(4, 64, 64, seed=3)
    cpu = patch_pseudo_labels(prob, truth, valid, 8, threshold_grid(20))
    dev = [x.cuda() for x in (prob, truth, valid)]
    gpu = patch_pseudo_labels(*dev, 8, threshold_grid(20, "cuda"))
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(a, b.cpu())
