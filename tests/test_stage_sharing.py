"""Stage results reused across runs (prn's base): same results as training it, keyed right."""

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raysegbg.checkpoint import list_checkpoints, load_state
from raysegbg.config import load_config
from raysegbg.data.synthetic import make_dataset
from raysegbg.local import train_local
from raysegbg.state.results import list_results
from tests.conftest import tiny_overrides

PRN = {"method.name": "prn", "method.prn.base_epochs": 2, "method.prn.patch_sizes": "[8,16]",
       "optim.name": "sgd", "optim.lr": 0.05, "train.epochs": 2}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "contrast"
    make_dataset("varying_contrast", out, n=48, size=32, seed=0)
    return out


def run(data: Path, root: Path, name: str, **extra) -> tuple[dict, list[str], Path]:
    lines: list[str] = []
    cfg = load_config(None, tiny_overrides(data, root, **{**PRN, "logging.name": name, **extra}))
    metrics, host = train_local(cfg, root / name, log=lines.append)
    return metrics, lines, host.run_dir


def base(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_state(list_checkpoints(run_dir)[-1][0])["method"]
    return {k: v for k, v in state.items() if k.startswith("base.")}


def test_a_base_is_trained_once_and_reused_with_the_same_results(data, tmp_path, capsys):
    _, first, a = run(data, tmp_path, "a")
    assert any("computing stage result prn-base-" in line for line in first)
    assert any("published stage result" in line for line in first)
    # other refiner settings: the base is loaded, its epochs are not trained again
    other = {"method.prn.patch_sizes": "[8]", "method.prn.pseudo_weight": 0.5}
    reused, lines, b = run(data, tmp_path, "b", **other)
    assert any("reused stage result prn-base-" in line for line in lines)
    assert not any(line.startswith("[base] epoch") for line in lines)
    assert [m["epoch"] for _, m in list_checkpoints(b)][-1] == 5  # base 2, labels 1, refine 2
    for key, value in base(a).items():
        assert torch.equal(value, base(b)[key]), key
    # the same run trained in full gives the same weights and metrics, to the bit
    fresh, lines, c = run(data, tmp_path, "c", **other, **{"train.reuse_stages": "false"})
    assert any(line.startswith("[base] epoch") for line in lines)
    for key in ("val/miou", "val/fg_dice", "train/loss", "step", "best_score"):
        assert reused[key] == fresh[key], key
    fresh_state = load_state(list_checkpoints(c)[-1][0])["method"]
    for key, value in load_state(list_checkpoints(b)[-1][0])["method"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, fresh_state[key]), key
    # listed with the settings that made it and the runs that used it
    (found,) = list_results(str(tmp_path))
    assert found["stage"] == "prn-base" and found["run"] == "a" and found["users"] == ["b"]
    assert found["settings"]["method.prn.base_epochs"] == 2 and found["bytes"] > 0
    assert "method.prn.patch_sizes" not in found["settings"]
    from raysegbg.cli import main

    capsys.readouterr()
    assert main(["state", "ls", "--storage", str(tmp_path)]) == 0
    assert found["key"] in capsys.readouterr().out


@pytest.mark.parametrize(
    "change",
    [
        {"train.seed": 1},
        {"method.prn.holdout": 0.4},
        {"model.decoder_channels": "[16,16,8]"},
        {"data": "other"},
    ],  # fmt: skip
    ids=["seed", "base-setting", "model", "dataset"],
)
def test_a_changed_key_trains_the_base_again(data, tmp_path, change):
    run(data, tmp_path, "a")
    change = dict(change)
    if change.pop("data", None):
        data = tmp_path / "other"
        make_dataset("varying_contrast", data, n=48, size=32, seed=1)
    _, lines, _ = run(data, tmp_path, "b", **change)
    assert any("computing stage result" in line for line in lines)
    assert len(list_results(str(tmp_path))) == 2


def test_a_failed_producer_leaves_nothing_published(data, tmp_path, monkeypatch):
    """A run dying inside the base stage publishes nothing; the next run computes it."""
    from raysegbg import train

    calls = {"n": 0}
    real = train.run_epoch

    def crash_second(trainer, writer):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(trainer, writer)

    monkeypatch.setattr(train, "run_epoch", crash_second)
    with pytest.raises(RuntimeError, match="killed"):
        run(data, tmp_path, "a")
    assert list_results(str(tmp_path)) == []
    monkeypatch.setattr(train, "run_epoch", real)
    _, lines, _ = run(data, tmp_path, "b")
    assert any("computing stage result" in line for line in lines)
    meta = json.loads(next((tmp_path / "stage_results").glob("*/meta.json")).read_text())
    assert meta["run"] == "b"


@pytest.mark.slow
def test_two_concurrent_trials_of_a_search_train_the_base_once(ray_local, data, tmp_path):
    """Two prn trials at once (other patch sizes, one base setting) ask the search's actor:
    one trains the base and publishes it, the other waits for it and reuses it."""
    from raysegbg.tune import SearchOptions, run_search

    space = tmp_path / "space.yaml"
    space.write_text("params:\n  method.prn.patch_sizes: "
                     "{type: categorical, choices: ['[8]', '[16]']}\n")  # fmt: skip
    overrides = tiny_overrides(data, tmp_path / "runs", **{**PRN, "scaling.workers": 1})
    opts = SearchOptions(space=str(space), overrides=overrides, samples=2, grid=True,
                         max_concurrent=2, scheduler="none", name="s")  # fmt: skip
    found = run_search(opts)
    assert [row.status for row in found.rows] == ["finished", "finished"]
    (result,) = list_results(str(tmp_path / "runs"))
    trials = sorted(row.name for row in found.rows)
    assert sorted([result["run"], *result["users"]]) == trials  # one made it, one used it
    epochs = {}
    for row in found.rows:
        acc = EventAccumulator(str(Path(found.search_dir) / row.name / "tb"))
        acc.Reload()
        epochs[row.name] = [e.step for e in acc.Scalars("perf/epoch_s")]
    assert epochs[result["run"]] == [1, 2, 3, 4, 5]
    assert epochs[result["users"][0]] == [3, 4, 5]  # base epochs 1-2 not trained again


def test_fbr_reuses_its_cam_stage_across_cam_thresholds(tmp_path):
    """fbr's CAM network and NROI bank are one stage result: a run with another CAM threshold
    (read only by the pseudo-mask stage) loads them and ends as training them would."""
    data = tmp_path / "contexts"
    make_dataset("contexts", data, n=60, size=32, seed=0)
    fbr = {"method.name": "fbr", "method.fbr.cam_epochs": 2, "train.epochs": 1,
           "train.steps_per_epoch": 2, "method.fbr.proj_dims": 16}  # fmt: skip
    _, first, a = run(data, tmp_path, "a", **fbr, **{"method.fbr.cam_threshold": 0.3})
    assert any("computing stage result fbr-cam-" in line for line in first)
    other = {**fbr, "method.fbr.cam_threshold": 0.4}
    reused, lines, b = run(data, tmp_path, "b", **other)
    assert any("reused stage result fbr-cam-" in line for line in lines)
    assert not any(line.startswith("[cam] epoch") for line in lines)
    fresh, _, c = run(data, tmp_path, "c", **other, **{"train.reuse_stages": "false"})
    for key in ("val/miou", "train/loss", "step", "best_score"):
        assert reused[key] == fresh[key], key
    final_b = load_state(list_checkpoints(b)[-1][0])["method"]
    final_c = load_state(list_checkpoints(c)[-1][0])["method"]
    for key, value in final_b.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, final_c[key]), key
    cam_a = load_state(list_checkpoints(a)[-1][0])["method"]
    assert all(torch.equal(v, final_b[k]) for k, v in cam_a.items() if k.startswith("cam."))


@pytest.mark.slow
def test_a_killed_producer_lets_the_waiting_run_compute_the_stage(ray_local, data, tmp_path):
    """Two runs share a search's stage-results actor. The one computing the base is killed
    (SIGKILL, inside the stage): its claim lapses, and the run that was waiting for the base
    computes and publishes it itself; nothing of the killed run is published."""
    import os
    import signal
    import time
    import uuid

    from raysegbg.state.results import start_service
    from raysegbg.state.sharing import Sharing

    ray = ray_local
    service = start_service(f"kill-{uuid.uuid4().hex[:8]}", str(tmp_path), lease_s=4.0)
    marker = tmp_path / "producing"
    overrides = tiny_overrides(data, tmp_path, **{**PRN, "logging.name": "a"})

    @ray.remote(num_cpus=0, max_retries=0)
    def produce() -> None:
        from raysegbg import train

        real = train.run_epoch

        def stall(trainer, writer):  # one base epoch, then hangs until killed
            out = real(trainer, writer)
            marker.write_text(str(os.getpid()))
            time.sleep(600)
            return out

        train.run_epoch = stall
        log = lambda line: None  # noqa: E731
        train_local(load_config(None, overrides), tmp_path / "a",
                    sharing=Sharing(service, "a", 0, log), log=log)  # fmt: skip

    producing = produce.remote()
    deadline = time.monotonic() + 180
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayError):
        ray.get(producing, timeout=60)

    lines: list[str] = []
    cfg = load_config(None, tiny_overrides(data, tmp_path, **{**PRN, "logging.name": "b"}))
    sharing = Sharing(service, "b", 0, lines.append, poll_s=0.2)
    train_local(cfg, tmp_path / "b", sharing=sharing, log=lines.append)
    waited = [line for line in lines if line.startswith("waiting for stage result")]
    assert waited and waited[0].endswith(": a computes it")  # the killed run's claim, live
    assert any("computing stage result prn-base-" in line for line in lines)
    (result,) = list_results(str(tmp_path))
    assert result["run"] == "b" and result["users"] == []
    ray.kill(service)


def test_cross_fit_fold_bases_are_stage_results_too(data, tmp_path):
    cross = {"method.prn.cross_fit": "true", "method.prn.base_epochs": 1, "train.epochs": 1}
    _, first, _ = run(data, tmp_path, "a", **cross)
    _, lines, _ = run(data, tmp_path, "b", **cross, **{"method.prn.pseudo_weight": 0.5})
    for stage in ("prn-fold1-base", "prn-fold2-base", "prn-base"):
        assert any(f"computing stage result {stage}-" in line for line in first), stage
        assert any(f"reused stage result {stage}-" in line for line in lines), stage
    assert len(list_results(str(tmp_path))) == 3
