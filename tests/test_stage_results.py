"""Stage results computed once per key (issue #18): the claim protocol, in threads and with
real Ray actors as the trials (concurrent needs, a killed producer)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from raysegbg.state.results import (
    StageResults,
    list_results,
    obtain,
    remove_result,
    stage_key,
    start_service,
)


def slow_compute(counter: Path, seconds: float = 1.0):
    """A stage that writes one file after `seconds`, counting its runs in `counter`."""

    def compute(folder: Path) -> dict:
        with counter.open("a") as f:
            f.write("run\n")
        time.sleep(seconds)
        (folder / "base.txt").write_text("weights")
        return {"stage": "base", "config": {"lr": 0.1}}

    return compute


def runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_the_key_changes_with_every_input_and_only_with_them():
    args = ("base", "fp-1", {"lr": 0.1, "epochs": 3}, 0, "v1")
    key = stage_key(*args)
    assert key == stage_key("base", "fp-1", {"epochs": 3, "lr": 0.1}, 0, "v1")  # key order
    changed = [
        ("refiner", "fp-1", {"lr": 0.1, "epochs": 3}, 0, "v1"),
        ("base", "fp-2", {"lr": 0.1, "epochs": 3}, 0, "v1"),  # another dataset
        ("base", "fp-1", {"lr": 0.2, "epochs": 3}, 0, "v1"),  # another base setting
        ("base", "fp-1", {"lr": 0.1, "epochs": 3}, 1, "v1"),  # another seed
        ("base", "fp-1", {"lr": 0.1, "epochs": 3}, 0, "v2"),  # another code version
    ]
    assert len({key, *(stage_key(*c) for c in changed)}) == 6


def test_threads_needing_one_result_compute_it_once(tmp_path):
    service = StageResults(str(tmp_path / "results"))
    counter = tmp_path / "count"
    got = []

    def need() -> None:
        got.append(obtain(service, "base-k", slow_compute(counter), poll_s=0.05))

    threads = [threading.Thread(target=need) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert runs(counter) == 1
    assert sorted(computed for _, computed in got) == [False, False, True]
    assert {Path(path) for path, _ in got} == {tmp_path / "results" / "base-k" / "data"}
    assert (tmp_path / "results" / "base-k" / "data" / "base.txt").read_text() == "weights"
    # a later need, after the service restarted (claims forgotten), loads it
    again = StageResults(str(tmp_path / "results"))
    assert obtain(again, "base-k", slow_compute(counter))[1] is False and runs(counter) == 1


def test_a_failed_producer_releases_its_claim_and_leaves_nothing(tmp_path):
    service = StageResults(str(tmp_path / "results"))

    def broken(folder: Path) -> dict:
        (folder / "half.txt").write_text("x")
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        obtain(service, "base-k", broken)
    assert not (tmp_path / "results" / "base-k").exists()  # nothing half-written published
    counter = tmp_path / "count"
    assert obtain(service, "base-k", slow_compute(counter, 0))[1] is True and runs(counter) == 1


def test_a_lapsed_claim_is_taken_over_and_the_stalled_producer_does_not_publish(tmp_path):
    service = StageResults(str(tmp_path / "results"), lease_s=0.2)
    assert service.claim("k", "a")["state"] == "compute"
    assert service.claim("k", "b")["state"] == "wait"
    time.sleep(0.3)  # `a` stopped renewing (it died, or stalled)
    assert service.claim("k", "b")["state"] == "compute"
    assert not service.renew("k", "a") and not service.publish("k", "a", {})
    (tmp_path / "results" / "k" / "data").mkdir(parents=True)
    assert service.publish("k", "b", {"config": {}})
    assert service.claim("k", "c")["state"] == "ready"


def test_listing_records_users_and_removal(tmp_path):
    service = StageResults(str(tmp_path / "stage_results"))
    obtain(service, "base-k", slow_compute(tmp_path / "count", 0))
    service.used_by("base-k", "search_001")
    service.used_by("base-k", "search_001")
    (listed,) = list_results(str(tmp_path))
    assert listed["key"] == "base-k" and listed["users"] == ["search_001"]
    assert listed["config"] == {"lr": 0.1} and listed["bytes"] == len("weights")
    meta = json.loads((tmp_path / "stage_results" / "base-k" / "meta.json").read_text())
    assert meta["producer"] and meta["created"] > 0
    remove_result(str(tmp_path), "base-k")
    assert list_results(str(tmp_path)) == []


# -- with Ray: trials are actors; the service is the actor a search starts ---------------------
class Trial:
    """A trial that needs the base result (a Ray actor in the tests below)."""

    def need(self, service, counter: str, seconds: float):
        import ray

        path, computed = obtain(service, "base-k", slow_compute(Path(counter), seconds),
                                call=ray.get, poll_s=0.1)  # fmt: skip
        return str(path), computed


@pytest.mark.slow
def test_two_concurrent_trials_compute_the_base_once(ray_local, tmp_path):
    ray = ray_local
    service = start_service(f"t-{time.time_ns()}", str(tmp_path))
    trial = ray.remote(num_cpus=0)(Trial)
    a, b = trial.remote(), trial.remote()
    counter = str(tmp_path / "count")
    outs = ray.get([a.need.remote(service, counter, 2.0), b.need.remote(service, counter, 2.0)])
    assert runs(Path(counter)) == 1
    assert sorted(c for _, c in outs) == [False, True] and len({p for p, _ in outs}) == 1
    ray.kill(service)


@pytest.mark.slow
def test_killing_the_producing_trial_lets_the_other_compute(ray_local, tmp_path):
    ray = ray_local
    service = start_service(f"t-{time.time_ns()}", str(tmp_path), lease_s=1.0)
    trial = ray.remote(num_cpus=0)(Trial)
    first, second = trial.remote(), trial.remote()
    counter = tmp_path / "count"
    doomed = first.need.remote(service, str(counter), 60.0)  # claims, then computes for long
    deadline = time.monotonic() + 30
    while runs(counter) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    waiting = second.need.remote(service, str(counter), 0.5)
    time.sleep(0.5)
    ray.kill(first)  # the producer dies mid-stage: its claim lapses within the lease
    path, computed = ray.get(waiting, timeout=60)
    assert computed and runs(counter) == 2
    assert (Path(path) / "base.txt").read_text() == "weights"
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(doomed)
    ray.kill(service)


def test_state_commands_list_show_and_remove(tmp_path, capsys):
    from raysegbg.cli import main

    service = StageResults(str(tmp_path / "stage_results"))
    obtain(service, "base-k", slow_compute(tmp_path / "count", 0))
    service.used_by("base-k", "trial_001")
    assert main(["state", "ls", "--storage", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "base-k" in listing and "trial_001" in listing and "7 B" in listing
    assert main(["state", "show", "--storage", str(tmp_path), "base-k"]) == 0
    assert json.loads(capsys.readouterr().out)["config"] == {"lr": 0.1}
    assert main(["state", "rm", "--storage", str(tmp_path), "base-k", "nope"]) == 2
    assert "no stage result 'nope'" in capsys.readouterr().err  # nothing removed: all checked
    assert main(["state", "rm", "--storage", str(tmp_path), "../base-k"]) == 2
    assert list_results(str(tmp_path))
    assert main(["state", "rm", "--storage", str(tmp_path), "base-k"]) == 0
    assert list_results(str(tmp_path)) == []
