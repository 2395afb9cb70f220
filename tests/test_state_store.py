"""The pseudo-label store: batched put/get, atomic Parquet persistence, clear errors."""

import numpy as np
import pytest

from raysegbg.errors import RaysegbgError
from raysegbg.state.store import PseudoLabelStore


def make_labels(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"img_{i:04d}" for i in range(n)]
    masks = [rng.integers(0, 4, (32, 32), dtype=np.uint8) for _ in range(n)]
    confs = [
        rng.random((32, 32), dtype=np.float32)
        if i % 3 == 0
        else (rng.random(5).astype(np.float32) if i % 3 == 1 else None)
        for i in range(n)
    ]
    return ids, masks, confs


def test_thousand_masks_round_trip_byte_identical(tmp_path):
    ids, masks, confs = make_labels(1000)
    store = PseudoLabelStore()
    for start in range(0, 1000, 250):
        sl = slice(start, start + 250)
        store.put(ids[sl], masks[sl], confs[sl], step=start)
    store.save(tmp_path / "labels")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    loaded = PseudoLabelStore.load(tmp_path / "labels")
    got = loaded.get(ids)
    for k, item in enumerate(got):
        assert item.mask.tobytes() == masks[k].tobytes() and item.mask.shape == (32, 32)
        if confs[k] is None:
            assert item.confidence is None
        else:
            assert item.confidence.tobytes() == confs[k].tobytes()
        assert item.step == (k // 250) * 250


def test_unknown_id_and_bad_masks_are_clear_errors():
    store = PseudoLabelStore()
    store.put(["a"], [np.zeros((4, 4), np.uint8)])
    with pytest.raises(RaysegbgError, match="no pseudo-label for 1 id.*'zz'"):
        store.get(["a", "zz"])
    with pytest.raises(RaysegbgError, match="must be a 2-D uint8 mask"):
        store.put(["b"], [np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(RaysegbgError, match="must be a 2-D uint8 mask"):
        store.put(["b"], [np.zeros((4, 4), np.float32)])
    with pytest.raises(RaysegbgError, match="confidence map for 'c' is"):
        store.put(["c"], [np.zeros((4, 4), np.uint8)], [np.zeros((3, 3), np.float32)])
    assert store.ids() == ["a"]  # a failed batch stores nothing
