"""`predict` without the run's dataset, with --probs/--overlay/--tta; `export` to a state
dict, TorchScript and ONNX; `eval`'s per-class table and confusion matrix. No Ray: the tiny
in-process run of conftest.py is the model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from PIL import Image

from raysegbg import export
from raysegbg.checkpoint import INFERENCE_KEY, STATE_FILE
from raysegbg.cli import main
from raysegbg.config import load_config, replace, save_config
from raysegbg.errors import RaysegbgError
from raysegbg.inference import load_run
from raysegbg.train import build_method


def write_images(folder: Path, size=(40, 50)) -> dict[str, np.ndarray]:
    """A random image, its mirror image and a mirror-symmetric one, RGB, of a size that is no
    multiple of 32, so the padding is cut off again."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    half = a[:, : size[1] // 2]
    arrays = {"a": a, "a_mirror": a[:, ::-1], "sym": np.concatenate([half, half[:, ::-1]], 1)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        Image.fromarray(np.ascontiguousarray(arr)).save(folder / f"{name}.png")
    return arrays


def predict(run: Path, input_dir: Path, output_dir: Path, *flags: str) -> int:
    return main(["predict", "--run", str(run), "--input", str(input_dir),
                 "--output", str(output_dir), *flags])  # fmt: skip


def without_dataset(run: Path, tmp_path: Path) -> None:
    """Point the run's config at a dataset folder that no longer exists."""
    cfg = load_config(run / "config.yaml")
    save_config(replace(cfg, data={"path": str(tmp_path / "deleted-dataset")}), run / "config.yaml")


def strip_records(run: Path) -> None:
    """Make every checkpoint of the run look written before checkpoints recorded inference
    metadata."""
    for state_file in run.glob(f"epoch_*/{STATE_FILE}"):
        state = torch.load(state_file, weights_only=True)
        state.pop(INFERENCE_KEY)
        torch.save(state, state_file)


def masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


# -- predict ----------------------------------------------------------------------------------
def test_predict_needs_no_dataset(tiny_run, run_copy, tmp_path, capsys):
    write_images(tmp_path / "in")
    assert predict(tiny_run, tmp_path / "in", tmp_path / "with") == 0
    config = (run_copy / "config.yaml").read_text()
    without_dataset(run_copy, tmp_path)
    assert predict(run_copy, tmp_path / "in", tmp_path / "without") == 0
    with_data, without = masks(tmp_path / "with"), masks(tmp_path / "without")
    assert with_data.keys() == without.keys() == {"a", "a_mirror", "sym"}
    assert all(np.array_equal(with_data[k], without[k]) for k in with_data)

    strip_records(run_copy)  # old checkpoints: without their dataset, one clear line
    capsys.readouterr()
    assert predict(run_copy, tmp_path / "in", tmp_path / "old") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "predates" in err and "deleted-dataset" in err
    assert not (tmp_path / "old").exists()
    (run_copy / "config.yaml").write_text(config)  # with it, as before
    assert predict(run_copy, tmp_path / "in", tmp_path / "old") == 0
    assert masks(tmp_path / "old")["a"].shape == (40, 50)


def test_probs_overlay_and_tta(tiny_run, tmp_path):
    arrays = write_images(tmp_path / "in")
    assert predict(tiny_run, tmp_path / "in", tmp_path / "plain", "--probs", "--overlay") == 0
    assert predict(tiny_run, tmp_path / "in", tmp_path / "tta", "--probs", "--tta") == 0
    out = tmp_path / "plain"
    mask = np.asarray(Image.open(out / "a.png"))
    probs = np.load(out / "probs" / "a.npy")
    overlay = np.asarray(Image.open(out / "overlay" / "a.png"))
    assert probs.dtype == np.float16 and probs.shape == (2, 40, 50)
    assert mask.shape == (40, 50) and overlay.shape == (40, 50, 3) and overlay.dtype == np.uint8
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=2e-3)
    decided = np.abs(probs[1].astype(np.float32) - probs[0]) > 2e-3  # beyond float16 rounding
    assert np.array_equal(probs.argmax(0)[decided], mask[decided])
    background = mask == 0
    assert np.array_equal(overlay[background], arrays["a"][background])  # untouched
    assert not np.array_equal(overlay[~background], arrays["a"][~background])  # tinted

    def p(folder: str, name: str) -> np.ndarray:
        return np.load(tmp_path / folder / "probs" / f"{name}.npy").astype(np.float32)

    # TTA = the mean of the image's softmax and its mirror image's, mirrored back
    expected = (p("plain", "a") + p("plain", "a_mirror")[:, :, ::-1]) / 2
    np.testing.assert_allclose(p("tta", "a"), expected, atol=2e-3)
    assert np.abs(p("tta", "a") - p("plain", "a")).max() > 1e-2  # it does change something
    # and nothing else: mirroring the image mirrors the result exactly, which the network
    # alone does not do
    np.testing.assert_array_equal(p("tta", "a_mirror"), p("tta", "a")[:, :, ::-1])
    np.testing.assert_array_equal(p("tta", "sym"), p("tta", "sym")[:, :, ::-1])
    assert not np.array_equal(p("plain", "sym"), p("plain", "sym")[:, :, ::-1])
    assert not (tmp_path / "tta" / "overlay").exists()


# -- export -----------------------------------------------------------------------------------
def exported(run: Path, fmt: str, out: Path, *flags: str) -> int:
    return main(["export", "--run", str(run), "--format", fmt, "--out", str(out), *flags])


def sample(h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def logits(tiny_run) -> dict[tuple[int, int], torch.Tensor]:
    """The tiny run's own logits for `sample(h, w)`, by (h, w)."""
    method = load_run(tiny_run)[2]
    with torch.no_grad():
        return {size: method.predict(sample(*size)) for size in ((64, 96), (96, 64))}


def test_state_dict_loads_into_a_fresh_smp_model(tiny_run, tmp_path, logits):
    out = tmp_path / "model.pt"
    assert exported(tiny_run, "state_dict", out) == 0
    sidecar = json.loads((tmp_path / "model.pt.json").read_text())
    assert sidecar["classes"] == ["background", "foreground"] and sidecar["channels"] == 3
    assert sidecar["normalize"] == {"mean": [127.5] * 3, "std": [127.5] * 3}
    assert sidecar["method"] == "baseline" and sidecar["model"]["encoder_depth"] == 3
    model = smp.create_model(**sidecar["smp"])
    model.load_state_dict(torch.load(out, weights_only=True))
    with torch.no_grad():
        assert torch.equal(model.eval()(sample()), logits[64, 96])


def test_torchscript_gives_the_method_s_logits(tiny_run, tmp_path, logits):
    out = tmp_path / "model.ts"
    assert exported(tiny_run, "torchscript", out) == 0
    with torch.no_grad():  # another size than the traced one
        torch.testing.assert_close(torch.jit.load(str(out))(sample()), logits[64, 96])


@pytest.mark.skipif(
    not (importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime")),
    reason="onnx and onnxruntime are not installed (pip install onnx onnxruntime)",
)
def test_onnx_gives_the_method_s_logits(tiny_run, tmp_path, logits):
    import onnxruntime

    out = tmp_path / "model.onnx"
    assert exported(tiny_run, "onnx", out) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": sample(96, 64).numpy()})[0]
    np.testing.assert_allclose(got, logits[96, 64].numpy(), atol=1e-4, rtol=0)


def test_export_never_overwrites_unasked(tiny_run, tmp_path, capsys):
    out = tmp_path / "model.pt"
    out.write_bytes(b"mine")
    assert exported(tiny_run, "state_dict", out) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--overwrite" in err
    assert out.read_bytes() == b"mine" and sorted(tmp_path.iterdir()) == [out]
    assert exported(tiny_run, "state_dict", out, "--overwrite", "--checkpoint", "last") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.json"]


def test_no_state_dict_without_a_plain_smp_model(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "plain_model", lambda method, sample: None)  # as for rrn
    assert exported(tiny_run, "state_dict", tmp_path / "m.pt") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "method 'baseline'" in err and "--format torchscript" in err
    assert not any(tmp_path.iterdir())


def test_onnx_without_the_package_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnx" else real(n))
    assert exported(tiny_run, "onnx", tmp_path / "m.onnx") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install onnx onnxruntime" in err
    assert not any(tmp_path.iterdir())


def method_of(tiny_data, name: str, *overrides: str):
    cfg = load_config(None, [f"data.path={tiny_data}", "model.encoder_depth=3",
                             "model.decoder_channels=[32,16,8]", f"method.name={name}",
                             *overrides])  # fmt: skip
    return build_method(cfg, 2, 3, 255).eval()


def test_whole_method_inference_is_traced_or_refused(tiny_data):
    """rrn's average of two networks is no single smp model: no state dict, but a traced
    module equal to `predict`; mcibi's stride follows the image size without a crop size,
    which a traced graph cannot follow: refused, naming the method."""
    rrn = method_of(tiny_data, "rrn")
    small, other = sample(64, 64), sample(96, 128)
    assert export.plain_model(rrn, small) is None
    traced = export._trace(export.MethodInference(rrn), "rrn", small, other)
    with torch.no_grad():
        torch.testing.assert_close(traced(other), rrn.predict(other))
    mcibi = export.MethodInference(method_of(tiny_data, "mcibi", "data.crop_size=0"))
    with pytest.raises(RaysegbgError, match="method 'mcibi' cannot be exported"):
        export._trace(mcibi, "mcibi", small, other)


# -- eval -------------------------------------------------------------------------------------
def test_eval_shows_per_class_metrics_and_the_confusion_matrix(tiny_run, tmp_path, capsys):
    assert main(["eval", "--run", str(tiny_run), "--split", "val",
                 "--json", str(tmp_path / "m.json")]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "confusion matrix (pixels; rows: truth, columns: prediction)" in text
    assert "Dice" in text and text.count("foreground") >= 3  # table row, header, matrix row
    result = json.loads((tmp_path / "m.json").read_text())
    cm = np.array(result["confusion"]["pixels"])
    assert cm.shape == (2, 2) and result["confusion"]["classes"] == ["background", "foreground"]
    fg = result["per_class"]["foreground"]
    assert fg["pixels"] == cm[1].sum()
    assert np.isclose(fg["dice"], 2 * cm[1, 1] / (cm[1].sum() + cm[:, 1].sum()))
    assert np.isclose(fg["iou"], result["iou/foreground"])
