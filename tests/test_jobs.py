"""`raysegbg submit|jobs|status|logs|stop` against a real token-protected Ray head.

The head is a private `ray start --head --block` on free ports with its own temp dir, stopped
by signalling its process group (`ray stop` would kill every Ray on the machine). The tests
without a head check the argument handling and the fail-fast errors.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from raysegbg import jobs
from raysegbg.checkpoint import list_checkpoints
from raysegbg.cli import main
from raysegbg.errors import RaysegbgError
from raysegbg.job_commands import add_job_commands, prepare_command
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without any Ray address or auth setting, plus `extra`."""
    drop = ("RAY_ADDRESS", "RAYSEGBG_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("RAY_AUTH")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is ours
    return {**env, **extra}


def _cli(*argv: str, env: dict[str, str], timeout: float = 150) -> subprocess.CompletedProcess:
    _require_job_commands()
    return subprocess.run(
        [sys.executable, "-m", "raysegbg.cli", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _wait_for_dashboard(url: str, token: str, head: subprocess.Popen, log: Path) -> None:
    request = urllib.request.Request(
        f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the dashboard at {url} did not come up:\n{log.read_text()[-3000:]}")


def _stop_head(head: subprocess.Popen) -> None:
    """SIGTERM `ray start --block` (it stops its node), then SIGKILL whatever its group left."""
    head.terminate()
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=10)


def _require_job_commands() -> None:
    from raysegbg.cli import build_parser

    if "submit" not in build_parser().format_usage():
        pytest.skip("raysegbg.cli does not offer `submit` yet: wire in add_job_commands")


def _head_env(auth: dict[str, str], gcs_port: int) -> dict[str, str]:
    """The head's environment, inherited by every Ray process and job on it."""
    return _clean_env(
        **auth,
        # Ray processes that look a cluster up by themselves (Train's placement-group cleaner
        # uses the State API) would see every Ray on this machine: point them at this one
        RAY_ADDRESS=f"127.0.0.1:{gcs_port}",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops the node at once
    )


def _head_args(temp_dir: str, ports: dict[str, int]) -> list[str]:
    args = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    args += ["--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats"]
    return args + ["--temp-dir", temp_dir] + [str(x) for kv in ports.items() for x in kv]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A token-protected head on 127.0.0.1 (2 CPUs); yields (dashboard URL, client env)."""
    tmp = tmp_path_factory.mktemp("head")
    token = secrets.token_hex(32)
    (tmp / "token").write_text(token)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp / "token")}
    low = random.randrange(21000, 29000, 200)  # below the ephemeral range, away from Ray's default
    ports = {
        "--port": _free_port(),
        "--dashboard-port": _free_port(),
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--min-worker-port": low,
        "--max-worker-port": low + 199,
    }
    log = tmp / "head.log"
    temp_dir = tempfile.mkdtemp(prefix="rsj-", dir="/tmp")
    with log.open("w") as out:
        head = subprocess.Popen(
            # a short folder: Ray's socket paths under it must fit in 107 bytes (pytest-xdist
            # tmp paths do not)
            _head_args(temp_dir, ports),
            env=_head_env(auth, ports["--port"]),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole at the end
        )
    try:
        url = f"http://127.0.0.1:{ports['--dashboard-port']}"
        _wait_for_dashboard(url, token, head, log)
        yield url, _clean_env(**auth)
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit_train(url: str, env: dict[str, str], overrides: list[str], *opts: str):
    """`raysegbg submit --wait` of a tiny train run; Train polls fast so the job ends promptly."""
    sets = [x for kv in overrides for x in ("--set", kv)]
    result = _cli("submit", "--address", url, *opts, "--wait", "--", "train", *sets, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_submit_follow_resume_and_manage(ray_head, tiny_data, tmp_path):
    url, env = ray_head
    runs = tmp_path / "runs"
    fast = tmp_path / "fast.yaml"  # Train's 10 s health poll would add ~20 s to every tiny job
    fast.write_text("env_vars: {RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: '0.5'}\n")
    opts = ("--name", "job-run", "--runtime-env", str(fast))
    done = _submit_train(url, env, tiny_overrides(tiny_data, runs, **{"scaling.workers": 1}), *opts)
    job_id = done.stdout.split("submitted job ")[1].split()[0]
    assert job_id.startswith("job-run-") and f"job {job_id} SUCCEEDED" in done.stdout
    logs = _cli("logs", job_id, "--address", url, env=env)
    assert "best checkpoint" in logs.stdout and "val mIoU" in logs.stdout
    assert {m["epoch"] for _, m in list_checkpoints(runs / "job-run")} <= {1, 2}
    assert (runs / "job-run" / "tb").is_dir()

    more = tiny_overrides(tiny_data, runs, **{"scaling.workers": 1, "train.epochs": 3})
    again = _submit_train(url, env, more, *opts)
    assert 3 in {m["epoch"] for _, m in list_checkpoints(runs / "job-run")}
    assert "resuming at epoch 3" in again.stdout and "epoch   1/3" not in again.stdout

    listed = _cli("jobs", "--address", url, env=env)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    assert "raysegbg train" in listed.stdout
    status = _cli("status", job_id, "--address", url, env=env)
    assert "SUCCEEDED" in status.stdout and "run job-run" in status.stdout
    stop = _cli("stop", job_id, "--address", url, env=env)
    assert stop.returncode == 0 and "had already ended" in stop.stdout


@pytest.mark.slow
def test_missing_wrong_token_and_unknown_job(ray_head, tiny_data, tmp_path):
    url, env = ray_head
    sets = ["--set", f"data.path={tiny_data}", "--set", f"logging.storage_path={tmp_path}"]
    home = {"HOME": str(tmp_path)}  # no ~/.ray/auth_token either
    no_token = _cli("submit", "--address", url, "--", "train", *sets, env=_clean_env(**home))
    assert no_token.returncode == 2
    assert "requires a token" in no_token.stderr and "RAY_AUTH_MODE=token" in no_token.stderr
    assert len(no_token.stderr.strip().splitlines()) == 1

    wrong = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64, **home)
    rejected = _cli("jobs", "--address", url, env=wrong)
    assert rejected.returncode == 2 and "rejected the token" in rejected.stderr

    unknown = _cli("logs", "no-such-job", "--address", url, env=env)
    assert unknown.returncode == 2 and "no job 'no-such-job'" in unknown.stderr


@pytest.mark.parametrize("address", ["http://127.0.0.1:{port}", "http://192.0.2.77:8265"])
def test_unreachable_address_fails_fast(address, tiny_data, tmp_path):
    url = address.format(port=_free_port())  # nothing listens there any more
    sets = ["--set", f"data.path={tiny_data}", "--set", f"logging.storage_path={tmp_path}"]
    start = time.perf_counter()
    result = _cli("submit", "--address", url, "--insecure-http", "--", "train", *sets,
                  env=_clean_env(), timeout=30)  # fmt: skip
    assert time.perf_counter() - start < 5
    assert result.returncode == 2 and "cannot reach the Ray dashboard" in result.stderr


def test_job_commands_parse_behind_the_main_parser():
    parser = argparse.ArgumentParser(prog="raysegbg")
    add_job_commands(parser.add_subparsers(dest="command", required=True))
    argv = ["submit", "--address", "http://h:8265", "--name", "r", "--", "train", "--set", "a=1"]
    args = parser.parse_args(argv)
    assert args.job_command == ["--", "train", "--set", "a=1"] and args.name == "r"
    assert args.wait is False and parser.parse_args([*argv[:1], "--wait", "--", "tune"]).wait
    assert parser.parse_args(["logs", "j1", "-f"]).follow
    for name in ("submit", "jobs", "status", "logs", "stop"):
        assert callable(
            parser.parse_args([name] + ([] if name in ("submit", "jobs") else ["j"])).func
        )


def test_address_from_env_and_normalised(monkeypatch):
    monkeypatch.delenv("RAYSEGBG_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RaysegbgError, match="pass --address"):
        jobs.dashboard_url(None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5")
    assert jobs.dashboard_url(None) == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAYSEGBG_ADDRESS", "https://ray.example.org/")
    assert jobs.dashboard_url(None) == "https://ray.example.org"
    assert jobs.dashboard_url("http://head:9000") == "http://head:9000"
    with pytest.raises(RaysegbgError, match="not a dashboard URL"):
        jobs.dashboard_url("ray://head:10001")


def test_prepare_command_settles_name_address_and_config(tiny_data, tmp_path):
    sets = ["--set", f"data.path={tiny_data}", "--set", f"logging.storage_path={tmp_path}"]
    config = str(ROOT / "configs" / "quickstart.yaml")
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("train:\n  epochs: 1\n")
    args, name = prepare_command(["--", "train", "--config", config, *sets], None, ROOT)
    assert name.startswith("baseline-") and args[-4:] == ["--name", name, "--address", "auto"]
    assert args[args.index("--config") + 1] == "configs/quickstart.yaml"  # relative to the job
    args, name = prepare_command(["train", "--name=a", "--address", "auto", *sets], None, ROOT)
    assert name == "a" and args.count("--name") == 1 and args.count("--address") == 1
    assert jobs.submission_id("my run/1").startswith("my-run-1-")
    for bad, match in [
        (["eval"], "after `--`"),
        (["train", "--address", "10.0.0.1:6379", *sets], "drop --address"),
        (["train"], "data.path='data/hetero_bg' is relative"),
        (["train", "--config", str(outside), *sets], "outside"),
    ]:
        with pytest.raises(RaysegbgError, match=match):
            prepare_command(bad, None, ROOT)
    with pytest.raises(RaysegbgError, match="several run names"):
        prepare_command(["train", "--name", "a", *sets], "b", ROOT)
    space = str(ROOT / "configs" / "quickstart.yaml")  # any file inside the project
    args, name = prepare_command(["tune", "--space", space, "--resume", "s1", *sets], None, ROOT)
    assert name == "s1" and "--name" not in args and args[-2:] == ["--address", "auto"]
    assert args[args.index("--space") + 1] == "configs/quickstart.yaml"
    args, name = prepare_command(["tune", *sets], None, ROOT)
    assert name.startswith("tune-") and args[args.index("--name") + 1] == name


def test_runtime_env_ships_project_and_merges_file(tmp_path):
    env = jobs.build_runtime_env(None, ROOT)
    assert env["working_dir"] == str(ROOT) and "/data" in env["excludes"]
    env = jobs.build_runtime_env(str(ROOT / "cluster" / "runtime_env.yaml"), ROOT)
    assert env["working_dir"] == str(ROOT) and "/data" in env["excludes"]
    assert env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    assert "py_modules" in jobs.build_runtime_env(None, None)
    (tmp_path / "bad.yaml").write_text("workdir: .\n")
    with pytest.raises(RaysegbgError, match="unknown keys \\['workdir'\\]"):
        jobs.build_runtime_env(str(tmp_path / "bad.yaml"), ROOT)


@pytest.mark.parametrize("address", ["http://10.1.2.3:8265", "head.example.org:8265"])
def test_plain_http_to_another_machine_needs_a_flag(address, capsys):
    """The token goes with every request: refused before any connection is tried."""
    for argv in (["jobs"], ["logs", "j1"], ["stop", "j1"]):
        assert main([*argv, "--address", address]) == 2
        err = capsys.readouterr().err.strip()
        assert "plain HTTP to another machine" in err and "--insecure-http" in err, err
        assert "\n" not in err
    for ok in ("http://127.0.0.1:8265", "http://localhost:8265", "https://head.example.org"):
        jobs.check_transport(jobs.dashboard_url(ok))
    jobs.check_transport("http://10.1.2.3:8265", insecure_http=True)
