"""A run's life beyond one `train`: a fresh run from a saved one (`--from-run`), the
environment.json every start writes, early stopping (`train.patience`) and the progress lines
within an epoch. In-process (no Ray): `raysegbg train` runs with `fit` replaced by
`train_local`."""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

import pytest

import raysegbg.ray_train
from raysegbg.checkpoint import list_checkpoints, pick_checkpoint
from raysegbg.cli import main
from raysegbg.config import load_config, save_config
from raysegbg.environment import git_state, read_environment, write_environment
from raysegbg.job_commands import prepare_command
from raysegbg.local import train_local
from raysegbg.progress import StepProgress, duration
from raysegbg.ray_train import RunResult
from raysegbg.train import Trainer
from tests.conftest import tiny_overrides
from tests.test_method_gates import train_until


@pytest.fixture
def cli_in_process(monkeypatch) -> list[str]:
    """`raysegbg train` trains in this process; returns the log lines of its runs."""
    lines: list[str] = []

    def fit(cfg, address=None):
        metrics, host = train_local(cfg, log=lines.append)
        return RunResult(host.run_dir, metrics, None, 0.0)

    monkeypatch.setattr(raysegbg.ray_train, "fit", fit)
    return lines


def epochs_of(run_dir: Path) -> list[int]:
    return [meta["epoch"] for _, meta in list_checkpoints(run_dir)]


def test_from_run_trains_a_new_run_and_leaves_the_old_one(
    tiny_data, tmp_path, cli_in_process, capsys
):
    runs = tmp_path / "runs"
    extra = {"logging.name": "t1", "logging.progress_every": 1e-9, "train.batch_size": 4,
             "train.steps_per_epoch": 3, "train.epochs": 1}  # fmt: skip
    lines = []
    train_local(load_config(None, tiny_overrides(tiny_data, runs, **extra)), log=lines.append)
    old = runs / "t1"
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    # progress within an epoch: every step but the last (the epoch line follows it)
    steps = [line for line in lines if " step " in line]
    assert len(steps) == 2 and re.fullmatch(
        r"epoch +1/1  step 1/3 \(33%\)  loss \d+\.\d{4}  \d+ img/s  ETA \d+s", steps[0]
    )

    # a fresh run under a generated name: epochs counted from 1, the old run untouched
    one_step = ["--set", "train.steps_per_epoch=1"]
    assert main(["train", "--from-run", str(old), *one_step, "--set", "train.epochs=2"]) == 0
    (new,) = [p for p in runs.iterdir() if p.name != "t1"]
    assert new.name.startswith("baseline-") and epochs_of(new) == [1, 2]
    assert load_config(new / "config.yaml").train.epochs == 2

    # --name: that name; the same command again resumes it (here: complete, evaluated only)
    command = ["train", "--from-run", str(old), "--name", "t2", *one_step]
    assert main(command) == 0 and epochs_of(runs / "t2") == [1]
    cli_in_process.clear()
    assert main(command) == 0 and epochs_of(runs / "t2") == [1]
    assert "run already complete (1 epochs): evaluating only" in cli_in_process

    # another run's name, or the source's own, is refused in one line
    capsys.readouterr()
    assert main([*command, "--set", "train.seed=2"]) == 2
    assert f"run {runs / 't2'} already exists" in capsys.readouterr().err
    assert main(["train", "--from-run", str(old), "--name", "t1"]) == 2
    assert "is the run --from-run reads" in capsys.readouterr().err
    assert main(["train", "--from-run", str(old), "--config", str(old / "config.yaml")]) == 2
    assert main(["train", "--from-run", str(tmp_path)]) == 2
    assert "not a raysegbg run folder" in capsys.readouterr().err
    after = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    assert after == before

    # --config of a complete run resumes it, and says how to start afresh instead
    cli_in_process.clear()
    assert main(["train", "--config", str(old / "config.yaml")]) == 0
    assert "run already complete (1 epochs): evaluating only" in cli_in_process
    assert any(f"use --from-run {old} to start a fresh run" in x for x in cli_in_process)
    assert epochs_of(old) == [1]


def test_refused_name_message_is_one_line(tiny_data, tmp_path, cli_in_process, capsys):
    runs = tmp_path / "runs"
    for name, seed in (("a", 0), ("b", 1)):  # a run folder as far as names go: its config
        (runs / name).mkdir(parents=True)
        overrides = tiny_overrides(tiny_data, runs, **{"logging.name": name, "train.seed": seed})
        save_config(load_config(None, overrides), runs / name / "config.yaml")
    assert main(["train", "--from-run", str(runs / "a"), "--name", "b"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: run {runs / 'b'} already exists")
    assert "pass another --name" in err


def test_submit_checks_a_from_run_config(tiny_data, tmp_path):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    extra = {"logging.name": "a", "method.name": "colab"}
    save_config(load_config(None, tiny_overrides(tiny_data, run.parent, **extra)),
                run / "config.yaml")  # fmt: skip
    args, name = prepare_command(["--", "train", "--from-run", str(run)], None, None)
    assert name.startswith("colab-") and args[-4:] == ["--name", name, "--address", "auto"]


def test_environment_json(tiny_data, tmp_path):
    extra = {"train.epochs": 1, "train.steps_per_epoch": 1}
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, **extra))
    _, host = train_local(cfg, tmp_path / "run", log=lambda line: None)
    record = json.loads((host.run_dir / "environment.json").read_text())
    for key, dist in [("torch", "torch"), ("ray", "ray"), ("raysegbg", "raysegbg"),
                      ("smp", "segmentation-models-pytorch")]:  # fmt: skip
        assert record[key] == metadata.version(dist)
    assert re.fullmatch(r"3\.\d+\.\d+", record["python"]) and record["platform"]
    git = record["git"]
    assert git is None or (re.fullmatch("[0-9a-f]{40}", git["commit"]) and "dirty" in git)
    assert "earlier" not in record
    assert not [p for p in host.run_dir.iterdir() if ".tmp" in p.name]

    # a resume in another environment keeps the earlier record; the same one does not
    record["torch"] = "0.0.1"
    (host.run_dir / "environment.json").write_text(json.dumps(record))
    write_environment(host.run_dir)
    write_environment(host.run_dir)
    again = read_environment(host.run_dir)
    assert again["torch"] == metadata.version("torch")
    assert [e["torch"] for e in again["earlier"]] == ["0.0.1"]


def test_git_state_without_a_checkout_or_git(tmp_path, monkeypatch):
    assert git_state(tmp_path) is None  # no repository
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert git_state(Path(raysegbg.__file__).parent.parent) is None


SCORES = [0.5, 0.6, 0.55, 0.58, 0.7, 0.8, 0.9, 0.95, 0.99]  # val/miou after epoch 1, 2, ...


def scripted_evaluate(trainer: Trainer):
    """Validation that scores epoch e (0-based) SCORES[e]: the test decides when it improves."""
    return {"val/miou": SCORES[trainer.epoch]}, []


def test_patience_stops_at_the_same_epoch_when_resumed(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "evaluate", scripted_evaluate)
    extra = {"train.epochs": 8, "train.steps_per_epoch": 1, "train.patience": 2}
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, **extra))
    lines: list[str] = []
    metrics, host = train_local(cfg, tmp_path / "whole", log=lines.append)
    # best 0.6 at epoch 2; epochs 3 (0.55) and 4 (0.58) do not improve it
    assert [r["epoch"] for r in host.reports] == [1, 2, 3, 4] and metrics["epoch"] == 4
    assert lines[-1].startswith("stopped early at epoch 4: val/miou has not improved for 2")
    assert pick_checkpoint(tmp_path / "whole", "best").name == "epoch_0002"
    # the checkpoint it stopped at records that the run ended (`raysegbg compare` reads it)
    flags = [meta["complete"] for _, meta in list_checkpoints(tmp_path / "whole")]
    assert flags[-1] is True and not any(flags[:-1]), flags

    # interrupted after epoch 3, inside the count: the resumed run stops at epoch 4 too
    train_until(cfg, tmp_path / "resumed", 3, monkeypatch)
    train_until(cfg, tmp_path / "resumed", None, monkeypatch)
    assert epochs_of(tmp_path / "resumed")[-1] == 4
    assert pick_checkpoint(tmp_path / "resumed", "last").name == "epoch_0004"

    # a stopped run run again is evaluated only; more patience continues it
    lines.clear()
    _, host = train_local(cfg, tmp_path / "whole", log=lines.append)
    assert [r["epoch"] for r in host.reports] == [4]
    assert "run already complete (stopped early at epoch 4): evaluating only" in lines
    more = {**extra, "train.patience": 3, "train.epochs": 5}
    more_cfg = load_config(None, tiny_overrides(tiny_data, tmp_path, **more))
    _, host = train_local(more_cfg, tmp_path / "whole", log=lambda line: None)
    assert [r["epoch"] for r in host.reports] == [5]


def test_progress_lines_every_n_seconds():
    now = [0.0]
    lines: list[str] = []
    progress = StepProgress(lines.append, 10, "epoch   3/20", 100, 16, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] = step * 0.5  # 0.5 s per step: a line at 10 s, 20 s, ..., never at the end
        progress.update(step, 0.25 * step)
    assert len(lines) == 4
    assert lines[0] == "epoch   3/20  step 20/100 (20%)  loss 0.2500  32 img/s  ETA 40s"
    quiet = StepProgress(lines.append, 0, "epoch 1/1", 100, 16, clock=lambda: 1e6)
    quiet.update(1, None)
    assert len(lines) == 4
    assert [duration(s) for s in (42, 185, 3720)] == ["42s", "3m05s", "1h02m"]


def test_a_one_shot_stage_line_has_no_loss():
    from raysegbg.progress import progress_line

    metrics = {"epoch": 3, "val/miou": 0.9, "val/fg_dice": 0.8, "val/fpr": 0.01,
               "perf/images_per_s": 100.0, "perf/epoch_s": 1.0}  # fmt: skip
    assert progress_line(metrics, 5) == (
        "epoch   3/5  val miou 0.9000  fg_dice 0.8000  fpr 0.0100  100 img/s  1.0s"
    )
    assert "loss 0.5000  val" in progress_line({**metrics, "train/loss": 0.5}, 5)
