"""Sliding-window inference (`raysegbg.sliding`) and its use by `eval` and `predict`.

The equality claims are made for pointwise models (1×1 convolutions): their output at a pixel
depends on that pixel only, so every window predicts exactly what the whole image does there,
and blending can change it only by float rounding. A model with spatial context sees zero
padding at a window's inner edges, so for it windows agree with the whole image only
approximately; the tests claim nothing there beyond running through the real path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from raysegbg import inference, predictor
from raysegbg.cli import main
from raysegbg.config import load_config
from raysegbg.data.synthetic import make_dataset
from raysegbg.local import train_local
from raysegbg.predictor import Predictor
from raysegbg.sliding import Windows, _coverage, blend_weights, sliding_window, starts
from tests.reliability.conftest import tiny_config

RECORD = {"normalize": {"mean": [127.5] * 3, "std": [127.5] * 3}, "pad_multiple": 32}


class Pointwise(nn.Module):
    """A seeded net of 1×1 convolutions: class probabilities per pixel, no spatial context."""

    def __init__(self, channels: int = 3, classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(channels, 8, 1), nn.ReLU(), nn.Conv2d(8, classes, 1))
        self.shapes: list[tuple[int, ...]] = []  # of every input, to see how it was called

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(images.shape))
        return self.net(images)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images).softmax(1)


# -- the tiling and blending themselves ---------------------------------------------------------
def test_window_starts_end_flush_with_the_border():
    assert starts(128, 32, 24) == [0, 24, 48, 72, 96]
    assert starts(133, 32, 24) == [0, 24, 48, 72, 96, 101]  # the last one flush, not past
    assert starts(32, 32, 24) == [0] and starts(20, 32, 24) == [0]  # smaller: padded


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("size", [(128, 133), (20, 140)])  # 4× a 32-px window; lower than one
def test_pointwise_model_gives_the_whole_image_result(blend, size):
    model = Pointwise()
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    windows = Windows(32, 64, overlap=0.25, blend=blend, batch_size=3)  # chunks span images
    got = sliding_window(model.probabilities, images, windows)
    assert got.shape == (2, 4, *size)
    torch.testing.assert_close(got, model.probabilities(images), rtol=0, atol=1e-6)
    assert {s[-2:] for s in model.shapes[:-1]} == {(32, 32)}  # all but the whole-image call


def constant_model(images: torch.Tensor) -> torch.Tensor:
    """The same probabilities, 1/4 and 3/4, at every pixel of every window."""
    probs = torch.tensor([0.25, 0.75]).view(1, 2, 1, 1)
    return probs.expand(len(images), 2, *images.shape[-2:])


def test_constant_model_gives_constant_output_up_to_the_borders():
    """Blending is a weighted average whose weights sum to the coverage everywhere, corners
    and the flush last windows included. With equal weights every sum here is exact in
    float32 (quarters times small integers), so the output is exactly constant; Gaussian
    weights are not exact binary fractions, so there it is constant to float rounding."""
    images = torch.zeros(1, 3, 101, 77)
    want = constant_model(images)
    constant = sliding_window(constant_model, images, Windows(32, 64, 0.5, "constant"))
    assert torch.equal(constant, want)
    gaussian = sliding_window(constant_model, images, Windows(32, 64, 0.3, "gaussian"))
    torch.testing.assert_close(gaussian, want, rtol=1e-6, atol=0)


def test_coverage_counts_the_windows_over_each_pixel():
    ones = blend_weights(4, "constant")
    cover = _coverage(ones, starts(10, 4, 3), starts(6, 4, 3), (10, 6))
    assert cover[0, 0] == 1 and cover[3, 3] == 4 and cover[9, 5] == 1  # corners: one window
    weights = blend_weights(32, "gaussian")
    assert weights.max() == weights[15, 15] and weights.min() > 0  # never a zero weight
    with pytest.raises(ValueError, match="gaussian, constant"):
        blend_weights(32, "box")


# -- when the predictor uses windows ------------------------------------------------------------
def predictor_of(tta: bool = False, windows: Windows | None = None) -> Predictor:
    return Predictor(Pointwise(), RECORD, tta, windows or Windows(32, 64, 0.25, "gaussian", 4))


def test_windows_only_for_images_above_max_whole():
    p = predictor_of()
    p.probabilities(np.zeros((64, 64, 3), np.uint8))  # 64 is not above max_whole
    assert p.method.shapes == [(1, 3, 64, 64)]
    p.method.shapes.clear()
    probs = p.probabilities(np.zeros((65, 40, 3), np.uint8))  # 65 is
    # rows start at 0, 24, 33; columns at 0, 8: six windows, four then two per call
    assert p.method.shapes == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert probs.shape == (4, 65, 40)


def test_tta_mirrors_the_whole_image_and_windows_both():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    windowed = predictor_of(tta=True)
    got = windowed.probabilities(arr)
    assert len(windowed.method.shapes) == 6  # 3×4 windows, 4 per call, image and mirror
    whole = predictor_of(tta=True, windows=Windows(32, 1000))
    np.testing.assert_allclose(got, whole.probabilities(arr), rtol=0, atol=1e-6)
    assert whole.method.shapes == [(1, 3, 96, 96)] * 2  # padded to the stride, no windows


def test_the_config_sizes_the_windows():
    def windows(*overrides: str) -> Windows | None:
        return inference.windows_of(load_config(None, ["data.crop_size=32", *overrides]))

    assert windows() == Windows(32, 64, 0.25, "gaussian", 32)  # train.val_batch_size
    assert windows("inference.window=48", "inference.overlap=0.5").max_whole == 96
    assert windows("inference.max_whole=100", "inference.blend=constant") == Windows(
        32, 100, 0.25, "constant", 32
    )
    assert windows("inference.max_whole=-1") is None
    assert windows("data.crop_size=0") is None  # trained on whole images: no size to use
    assert windows("data.crop_size=0", "inference.window=64").size == 64


# -- eval and predict of a tiny run on large images ---------------------------------------------
@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    """A tiny run trained on 32-px crops of 128-px images (more than twice the crop)."""
    data = tmp_path_factory.mktemp("data") / "big"
    make_dataset("hetero_bg", data, n=20, size=128, seed=0)
    root = tmp_path_factory.mktemp("runs")
    train_local(tiny_config(data, root), root / "big", log=lambda line: None)
    return root / "big"


@pytest.fixture
def calls(monkeypatch) -> list[tuple[int, ...]]:
    """The image batch shape of every sliding-window call."""
    seen, real = [], predictor.sliding_window

    def spy(model, images, windows):
        seen.append(tuple(images.shape))
        return real(model, images, windows)

    monkeypatch.setattr(predictor, "sliding_window", spy)
    return seen


def eval_json(run: Path, out: Path, *extra: str) -> dict:
    assert main(["eval", "--run", str(run), "--split", "test", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_eval_uses_windows_on_large_images(big_run, tmp_path, calls, capsys):
    windowed = eval_json(big_run, tmp_path / "w.json")
    assert calls and all(shape[-2:] == (128, 128) for shape in calls)
    calls.clear()
    whole = eval_json(big_run, tmp_path / "h.json", "--set", "inference.max_whole=-1")
    assert calls == []
    assert windowed.keys() == whole.keys()
    truth = [sum(row) for row in windowed["confusion"]["pixels"]]
    assert truth == [sum(row) for row in whole["confusion"]["pixels"]]  # same pixels scored


class Threshold(nn.Module):
    """Pointwise and far from ties: class 1 where the first channel is below mid-grey (pixel
    values are whole numbers, so |x| >= 1/255 and the probabilities differ by >= 0.03)."""

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = images[:, :1]
        return torch.cat([10 * x, -10 * x], 1)


def test_eval_and_predict_agree_either_way_for_a_pointwise_model(
    big_run, tmp_path, calls, monkeypatch, capsys
):
    monkeypatch.setattr(inference, "build_loaded", lambda *args: Threshold())
    windowed = eval_json(big_run, tmp_path / "w.json", "--set", "inference.blend=constant")
    whole = eval_json(big_run, tmp_path / "h.json", "--set", "inference.max_whole=-1")
    assert len(calls) == 1 and windowed == whole  # one eval batch in windows; same metrics

    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 256, (150, 97, 3), dtype=np.uint8)).save(tmp_path / "in/a.png")
    for out, extra in (("w", []), ("h", ["--set", "inference.max_whole=-1"])):
        args = ["predict", "--run", str(big_run), "--input", str(tmp_path / "in"),
                "--output", str(tmp_path / out), "--tta", "--probs", *extra]  # fmt: skip
        assert main(args) == 0
    assert len(calls) == 3  # the image and its mirror image, in windows
    probs_w, probs_h = (np.load(tmp_path / f"{o}/probs/a.npy") for o in "wh")
    assert probs_w.shape == (2, 150, 97)
    np.testing.assert_allclose(probs_w, probs_h, rtol=0, atol=1e-3)  # float16 files
    masks = [np.asarray(Image.open(tmp_path / f"{o}/a.png")) for o in "wh"]
    np.testing.assert_array_equal(*masks)
