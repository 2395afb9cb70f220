"""Bad input, one case each: exit code 2 and one stderr line, `error: ...`, that names the
fix, before Ray starts, and not one file left behind (no run folder, no half-written dataset,
no mask folder, no temporary folder).

Each case is a function of an `Env` that sets the scene under the test's own folder and
returns the command line; the folder's listing is taken just before the command runs and
must be the same after it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import cache, cached_property
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raysegbg import ray_train
from raysegbg.checkpoint import STATE_FILE, checkpoint_name, save_checkpoint
from raysegbg.cli import main
from raysegbg.config import load_config, save_config
from raysegbg.data.format import read_meta
from raysegbg.data.synthetic import make_dataset
from raysegbg.train import build_method
from tests.conftest import tiny_overrides


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for bad input")

    monkeypatch.setattr(ray_train, "init_ray", refuse)
    monkeypatch.setattr("raysegbg.tune.init_ray", refuse)  # tune imported it by name


class Env:
    """The scene of one case: the test's folder and the session's tiny dataset."""

    def __init__(self, tmp: Path, request: pytest.FixtureRequest) -> None:
        self.tmp, self.request = tmp, request

    @cached_property
    def data(self) -> Path:
        return self.request.getfixturevalue("tiny_data")

    def data_copy(self) -> Path:
        return Path(shutil.copytree(self.data, self.tmp / "data"))

    def run(self, data: Path | None = None, weights: bool = False) -> Path:
        """A run folder as `raysegbg train` leaves it (config.yaml, two checkpoints). Only with
        `weights` do the checkpoints hold the (untrained) weights of the config's model: the
        cases without them fail before any weights are read, or damage them first."""
        run, data = self.tmp / "run", data or self.data
        run.mkdir()
        cfg = load_config(None, tiny_overrides(data, self.tmp))
        save_config(cfg, run / "config.yaml")
        method = untrained_weights(data) if weights else {}
        for epoch in (1, 2):
            meta = {"epoch": epoch, "metrics": {"val/miou": 0.5}}
            save_checkpoint(run / checkpoint_name(epoch), {"method": method, "epoch": epoch}, meta)
        return run

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
        return path

    def image(self, name: str, arr: np.ndarray) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)
        return path

    def train(self, *extra: object, data: Path | None = None) -> list:
        return ["train", "--set", f"data.path={data or self.data}",
                "--set", f"logging.storage_path={self.tmp / 'runs'}",
                "--set", "logging.name=bad", *extra]  # fmt: skip

    def tune(self, space: str | bytes, *extra: object) -> list:
        return ["tune", "--space", self.file("space.yaml", space), *self.train(*extra)[1:]]

    def folder(self) -> list:
        """`data import folder` of four valid 32-px image/mask pairs a case breaks one way."""
        for i in range(4):
            self.image(f"img/a{i}.png", np.full((32, 32, 3), 40 * i, np.uint8))
            self.image(f"msk/a{i}.png", np.zeros((32, 32), np.uint8))
        return ["data", "import", "folder", "--images", self.tmp / "img",
                "--masks", self.tmp / "msk", "--classes", "background", "object",
                "--out", self.tmp / "out"]  # fmt: skip

    def predict(self, run: Path, *images: tuple[str, np.ndarray | bytes], out: str = "out") -> list:
        (self.tmp / "in").mkdir(exist_ok=True)
        for name, content in images:
            if isinstance(content, bytes):
                self.file(f"in/{name}", content)
            else:
                self.image(f"in/{name}", content)
        return ["predict", "--run", run, "--input", self.tmp / "in", "--output", self.tmp / out]

    def png_head(self) -> bytes:
        """The first 60 bytes of a valid PNG: a file cut short while it was copied."""
        return self.image("whole.png", RGB).read_bytes()[:60]


@cache
def untrained_weights(data: Path) -> dict:
    """The method's state dict for the tiny config on `data`, built once per dataset."""
    cfg, meta = load_config(None, tiny_overrides(data, data)), read_meta(data)
    return build_method(cfg, meta.num_classes, meta.channels, meta.ignore_index).state_dict()


Case = Callable[[Env], list]
RGB = np.zeros((32, 32, 3), np.uint8)


# -- cases that need a few lines of scene -------------------------------------------------------
def broken_import(breakage: Callable[[Env], object]) -> Case:
    """`data import folder` of the valid pairs after `breakage` spoilt them."""

    def case(env: Env) -> list:
        args = env.folder()
        breakage(env)
        return args

    return case


def corrupt_shard(env: Env, command: str) -> list:
    data = env.data_copy()
    shard = sorted(data.glob("train-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # cut short, as by a full disk
    return ["data", "info", data] if command == "info" else env.train(data=data)


def missing_shard(env: Env) -> list:
    data = env.data_copy()
    sorted(data.glob("val-*.parquet"))[0].unlink()
    return env.train(data=data)


def prn_on_multiclass(env: Env) -> list:
    data = env.tmp / "multi"
    make_dataset("ambiguous", data, n=12, size=32, seed=0)
    return env.train("--set", "method.name=prn", data=data)


def damaged_checkpoints(env: Env, damage: Callable[[Path], None]) -> list:
    run = env.run()
    for state in run.glob(f"epoch_*/{STATE_FILE}"):
        damage(state)
    return ["eval", "--run", run, "--split", "val"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def grayscale_run(env: Env) -> Path:
    make_dataset("head", env.tmp / "gray", n=12, size=32, seed=0)
    return env.run(env.tmp / "gray", weights=True)


LR_SPACE = "params:\n  optim.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}\n"
# fmt: off
CASES: list = [
    # -- the command line and the run config --------------------------------------------------
    ("unknown-key", lambda e: e.train("--set", "train.epohcs=2"),
     "unknown config key 'train.epohcs': valid keys are train.epochs"),
    ("unknown-section", lambda e: e.train("--set", "trian.epochs=2"),
     "unknown config key 'trian': valid keys are data, model"),
    ("wrong-type", lambda e: e.train("--set", "optim.lr=fast"),
     "config key 'optim.lr' expects float", "fix the value"),
    ("unknown-arch", lambda e: e.train("--set", "model.arch=x"),
     "unknown model.arch 'x': choose one of", "unet", "deeplabv3plus", "segformer"),
    ("unknown-encoder", lambda e: e.train("--set", "model.encoder=resnet7"),
     "unknown model.encoder 'resnet7': choose one of"),
    ("unknown-method", lambda e: e.train("--set", "method.name=magic"),
     "unknown method 'magic': choose one of baseline"),
    ("set-without-value", lambda e: e.train("--set", "train.epochs"),
     "is not key=value: write e.g. --set train.epochs=5"),
    ("workers-0-set", lambda e: e.train("--set", "scaling.workers=0"),
     "scaling.workers=0 is out of range: use an integer >= 1"),
    ("workers-0-flag", lambda e: e.train("--workers", "0"),
     "--workers 0 is out of range: use an integer >= 1"),
    ("batch-not-divisible", lambda e: e.train("--set", "train.batch_size=8", "--workers", "3"),
     "train.batch_size (8) must be divisible by the number of workers (3): change one"),
    ("min-workers-above", lambda e: e.train("--set", "scaling.min_workers=3", "--workers", "2"),
     "scaling.min_workers (3) is above scaling.workers (2): use at most as many"),
    ("elastic-batch-not-divisible",
     lambda e: e.train("--set", "train.batch_size=4", "--set", "scaling.workers=4",
                       "--set", "scaling.min_workers=3"),
     "train.batch_size (4) must be divisible by every number of workers an elastic run may "
     "use (scaling.min_workers 3 to scaling.workers 4)"),
    ("lr-nan", lambda e: e.train("--set", "optim.lr=.nan"),
     "config key 'optim.lr' is nan: use a finite number"),
    ("lr-inf", lambda e: e.train("--set", "optim.lr=inf"),
     "config key 'optim.lr' is inf: use a finite number"),
    ("lr-0", lambda e: e.train("--set", "optim.lr=0"), "optim.lr must be > 0", "use e.g. 1e-3"),
    ("epochs-0", lambda e: e.train("--set", "train.epochs=0"),
     "train.epochs=0 is out of range: use an integer >= 1"),
    ("crop-negative", lambda e: e.train("--set", "data.crop_size=-1"),
     "data.crop_size=-1 is out of range: use an integer >= 0"),
    ("rotate-negative", lambda e: e.train("--set", "data.rotate=-10"),
     "data.rotate=-10.0 is out of range: use a number in [0, 180] (0: off)"),
    ("gamma-too-strong", lambda e: e.train("--set", "data.gamma=5"),
     "data.gamma=5.0 is out of range: use a number in [0, 2] (0: off)"),
    ("elastic-smoothness-0", lambda e: e.train("--set", "data.elastic_smoothness=0"),
     "data.elastic_smoothness=0.0 is out of range: use a number >= 1"),
    ("val-batch-0", lambda e: e.train("--set", "train.val_batch_size=0"),
     "train.val_batch_size=0 is out of range: use an integer >= 1"),
    ("image-every-0", lambda e: e.train("--set", "logging.image_every=0"),
     "logging.image_every=0 is out of range: use an integer >= 1"),
    ("momentum-2", lambda e: e.train("--set", "optim.momentum=2"),
     "optim.momentum=2.0 is out of range: use a number in [0, 1]"),
    ("weight-decay-negative", lambda e: e.train("--set", "optim.weight_decay=-1e-4"),
     "optim.weight_decay=-0.0001 is out of range: use a number >= 0"),
    ("score-unknown", lambda e: e.train("--set", "logging.score=val/accuracy"),
     "logging.score='val/accuracy' is not a score", "use one of val/miou"),
    ("score-not-a-class", lambda e: e.train("--set", "logging.score=val/iou/boat"),
     "logging.score='val/iou/boat'", "val/iou/background, val/iou/foreground"),
    ("depth-vs-decoder", lambda e: e.train("--set", "model.decoder_channels=[8]"),
     "cannot build Unet/resnet18", "change model.encoder_depth, model.decoder_channels"),
    ("weights-not-torch", lambda e: e.train(
        "--set", f"model.weights_path={e.file('w.pt', b'not torch')}"),
     "is not a torch weights file", "torch.save(model.state_dict(), path)"),
    ("bad-run-name", lambda e: e.train("--name", "../elsewhere"),
     "--name='../elsewhere' is not a plain folder name", "e.g. 'elsewhere'"),
    ("unreachable-address", lambda e: e.train("--address", "127.0.0.1:1"),
     "cannot reach a Ray cluster at 127.0.0.1:1", "ray start --head"),
    ("config-missing", lambda e: ["train", "--config", e.tmp / "nope.yaml"],
     "nope.yaml not found: pass an existing YAML"),
    ("config-is-a-folder", lambda e: ["train", "--config", e.tmp],
     "cannot read config file", "pass a readable YAML file"),
    ("config-not-utf8", lambda e: ["train", "--config", e.file("c.yaml", b"train: # caf\xe9\n")],
     "is not UTF-8 text (byte 0xe9 at offset 12): save it as UTF-8"),
    ("config-not-yaml", lambda e: ["train", "--config", e.file("c.yaml", "train: {epochs: [\n")],
     "is not valid YAML (line", "fix the YAML syntax there"),
    ("config-not-a-mapping", lambda e: ["train", "--config", e.file("c.yaml", "- 1\n")],
     "must hold a mapping of sections, e.g. 'train: {epochs: 5}'"),
    # -- datasets ------------------------------------------------------------------------------
    ("dataset-missing", lambda e: e.train(data=e.tmp / "nothing"),
     "no dataset at", "raysegbg data make"),
    ("prn-on-multiclass", prn_on_multiclass,
     "prn refines binary segmentation but the dataset has", "varying_contrast"),
    ("train-corrupt-shard", lambda e: corrupt_shard(e, "train"),
     "train-00000.parquet is corrupt", "re-run `raysegbg data import`"),
    ("info-corrupt-shard", lambda e: corrupt_shard(e, "info"),
     "train-00000.parquet is corrupt", "re-run `raysegbg data import`"),
    ("train-missing-shard", missing_shard,
     "val-00000.parquet listed in dataset.json is missing", "re-run `raysegbg data import`"),
    ("info-bad-meta", lambda e: ["data", "info", e.file("d/dataset.json", "{").parent],
     "dataset.json is invalid", "re-create the dataset"),
    ("import-missing-mask", broken_import(lambda e: (e.tmp / "msk/a2.png").unlink()),
     "a2", "pass --allow-unlabeled"),
    ("import-size-mismatch",
     broken_import(lambda e: e.image("msk/a1.png", np.zeros((30, 32), np.uint8))),
     "32", "masks must match their image size"),
    ("import-label-out-of-range",
     broken_import(lambda e: e.image("msk/a3.png", np.full((32, 32), 7, np.uint8))),
     "7", "fix the mask"),
    ("import-corrupt-png",
     broken_import(lambda e: e.file("img/a0.png", b"\x89PNG\r\n\x1a\nnot really")),
     "a0", "replace or remove the file"),
    ("import-empty",
     broken_import(lambda e: [p.unlink() for p in (e.tmp / "img").iterdir()]),
     "no images"),
    ("import-bad-fractions", lambda e: [*e.folder(), "--val", "0.6", "--test", "0.5"],
     "val=0.6, test=0.5 are invalid: use fractions >= 0 with sum < 1"),
    ("make-labeled-fraction",
     lambda e: ["data", "make", "hetero_bg", "--n", "8", "--size", "32",
                "--labeled-fraction", "1.5", "--out", e.tmp / "made"],
     "labeled_fraction=1.5 is out of range: use a value in [0, 1]"),
    ("make-too-small", lambda e: ["data", "make", "hetero_bg", "--n", "0", "--out", e.tmp / "m"],
     "use n >= 1"),
    ("nifti-unpaired",
     lambda e: ["data", "import", "nifti", "--image", e.tmp / "a.nii", "--image", e.tmp / "b.nii",
                "--label", e.tmp / "l.nii", "--out", e.tmp / "n"],
     "give one --label per --image"),
    # -- search spaces -------------------------------------------------------------------------
    ("space-not-yaml", lambda e: e.tune("params: {optim.lr: {type: float, low: [}\n"),
     "is not valid YAML (line 1", "fix the YAML syntax there"),
    ("space-not-utf8", lambda e: e.tune(LR_SPACE.encode() + b"# \xe9\n"),
     "is not UTF-8 text", "save it as UTF-8"),
    ("space-unknown-top-key", lambda e: e.tune(LR_SPACE + "trials: 3\n"),
     "unknown key 'trials': valid keys are params, description"),
    ("space-unknown-param-key",
     lambda e: e.tune("params:\n  optim.lr: {type: float, low: 0.1, high: 1.0, stepp: 1}\n"),
     "unknown key 'stepp' for type float: valid type, when, low, high, step"),
    ("space-inverted-range",
     lambda e: e.tune("params:\n  optim.lr: {type: float, low: 0.1, high: 0.01}\n"),
     "inverted range low=0.1 > high=0.01: swap them"),
    ("space-nan-bound",
     lambda e: e.tune("params:\n  optim.lr: {type: float, low: .nan, high: 0.01}\n"),
     "`low` is nan: use a finite number"),
    ("space-invalid-value",
     lambda e: e.tune("params:\n  train.epochs: {type: int, low: 0, high: 3}\n"),
     "train.epochs=0 is invalid", "use an integer >= 1"),
    ("space-unknown-path",
     lambda e: e.tune("params:\n  optim.lrr: {type: float, low: 0.1, high: 1.0}\n"),
     "unknown config key 'optim.lrr'", "fix the path (a config key)"),
    # -- checkpoints ---------------------------------------------------------------------------
    ("checkpoints-truncated", lambda e: damaged_checkpoints(e, truncate),
     "no readable checkpoint in", "truncated or corrupt", "train the run again"),
    ("checkpoints-not-torch",
     lambda e: damaged_checkpoints(e, lambda p: p.write_bytes(b"not a checkpoint")),
     "no readable checkpoint in", "train the run again"),
    ("checkpoint-foreign-torch-file",
     lambda e: damaged_checkpoints(e, lambda p: torch.save({"w": torch.zeros(2)}, p)),
     "is not a raysegbg checkpoint", "pass a checkpoint written by `raysegbg train`"),
    ("checkpoint-of-another-model",
     lambda e: damaged_checkpoints(
         e, lambda p: torch.save({"method": {"net.x": torch.zeros(1)}, "epoch": 1}, p)),
     "does not fit the model its run config builds", "or train the run again"),
    ("eval-not-a-run", lambda e: ["eval", "--run", e.tmp / "no-such-run"],
     "not a raysegbg run folder (no config.yaml): pass the folder printed by"),
    ("eval-json-folder-missing",
     lambda e: ["eval", "--run", e.run(), "--json", e.tmp / "no" / "m.json"],
     "does not exist: create it"),
    ("eval-unknown-split", lambda e: ["eval", "--run", e.run(weights=True), "--split", "tset"],
     "unknown split 'tset': use one of train, val, test"),
    # -- predict -------------------------------------------------------------------------------
    ("predict-corrupt-image",
     lambda e: e.predict(e.run(weights=True), ("ok.png", RGB), ("bad.png", b"\x89PNG\r\n\x1a\nxx")),
     "cannot read image", "bad.png", "remove or replace it"),
    ("predict-truncated-image",
     lambda e: e.predict(e.run(weights=True), ("ok.png", RGB), ("cut.png", e.png_head())),
     "cannot read image", "cut.png", "remove or replace it"),
    ("predict-colour-for-grayscale-run",
     lambda e: e.predict(grayscale_run(e), ("rgb.png", RGB)),
     "rgb.png is colour (RGB) but the run was trained on grayscale", "convert it to grayscale"),
    ("predict-no-images", lambda e: e.predict(e.run()),
     "no images (.png/.jpg/...) in", "pass a folder of images"),
    ("predict-into-input",
     lambda e: e.predict(e.run(), ("a.png", RGB), out="in/masks"),
     "pass an output folder outside the input folder"),
    # -- sliding-window inference (inference.*) ------------------------------------------------
    ("inference-overlap-1", lambda e: e.train("--set", "inference.overlap=1"),
     "inference.overlap=1.0 is out of range: use a number in [0, 1)"),
    ("inference-blend-unknown", lambda e: e.train("--set", "inference.blend=box"),
     "inference.blend='box' is not one of: gaussian, constant"),
    ("inference-window-negative", lambda e: e.train("--set", "inference.window=-8"),
     "inference.window=-8 is out of range: use an integer >= 0 (0: data.crop_size)"),
    ("inference-max-whole-below-off", lambda e: e.train("--set", "inference.max_whole=-2"),
     "inference.max_whole=-2 is out of range: use an integer >= -1", "-1: never use windows"),
    ("eval-set-overlap-negative",
     lambda e: ["eval", "--run", e.run(), "--set", "inference.overlap=-0.5"],
     "inference.overlap=-0.5 is out of range: use a number in [0, 1)"),
    ("eval-set-unknown-inference-key",
     lambda e: ["eval", "--run", e.run(), "--set", "inference.windw=64"],
     "unknown config key 'inference.windw': valid keys are inference.window"),
    ("eval-set-a-training-key",
     lambda e: ["eval", "--run", e.run(), "--set", "data.crop_size=128"],
     "--set data.crop_size=128: eval and predict change only inference.* keys"),
    ("predict-set-blend-unknown",
     lambda e: [*e.predict(e.run(), ("a.png", RGB)), "--set", "inference.blend=box"],
     "inference.blend='box' is not one of: gaussian, constant"),
]
# fmt: on


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("setup, expected", [pytest.param(c[1], c[2:], id=c[0]) for c in CASES])
def test_bad_input(request, tmp_path, capsys, setup: Case, expected: tuple[str, ...]):
    args = [str(a) for a in setup(Env(tmp_path, request))]
    before = listing(tmp_path)
    capsys.readouterr()  # what setting up the scene printed
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for text in expected:
        assert text in err, err
    assert listing(tmp_path) == before  # nothing written, not even a temporary folder


def test_there_are_at_least_25_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 25
