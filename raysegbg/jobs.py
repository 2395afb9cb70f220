"""Ray Jobs API: submit the raysegbg CLI to a cluster, then list, inspect, follow and stop jobs.

The only module that talks to the Jobs API (the head's dashboard, port 8265). A job runs the
same CLI (`python -m raysegbg.cli train|tune ...`) on the head, joined to the cluster it runs on
(`--address auto`). Everything that needs no cluster is checked first, then the address (TCP,
a few seconds) and the token, so bad input fails with one line before any upload.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import shlex
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from raysegbg.errors import RaysegbgError

ADDRESS_ENV = ("RAYSEGBG_ADDRESS", "RAY_ADDRESS")
DASHBOARD_PORT = 8265
# gitignore patterns relative to the project root; a leading / keeps raysegbg/data/ shipped
EXCLUDES = ["/.venv", "/runs", "/data", "/.git", "__pycache__", "*.egg-info", ".*_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TOKEN_FIX = (
    "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token, "
    "or copy ~/.ray/auth_token from the head (`ray get-auth-token` prints it there)"
)


@dataclass(frozen=True)
class Connection:
    """A Jobs API client and the dashboard URL it talks to (for error messages)."""

    url: str
    client: Any  # ray.job_submission.JobSubmissionClient


@dataclass(frozen=True)
class Submission:
    """What `submit` did: the job id, the run it trains, the command it runs, where."""

    job_id: str
    run_name: str
    entrypoint: str
    conn: Connection


def dashboard_url(address: str | None) -> str:
    """`--address`, else $RAYSEGBG_ADDRESS / $RAY_ADDRESS, as http(s)://host:port."""
    source = "--address"
    if not address:
        source, address = next(
            ((v, os.environ[v]) for v in ADDRESS_ENV if os.environ.get(v)), ("", "")
        )
    if not address:
        raise RaysegbgError(
            "no Ray cluster address: pass --address http://HEAD:8265 (the head's dashboard) "
            "or set RAYSEGBG_ADDRESS"
        )
    url = urlparse(address if "://" in address else f"http://{address}")
    if url.scheme not in ("http", "https") or not url.hostname or address in ("auto", "local"):
        raise RaysegbgError(
            f"{address!r} (from {source}) is not a dashboard URL: the Jobs API talks to the "
            "head's dashboard, e.g. --address http://HEAD:8265"
        )
    netloc = url.netloc if url.port or url.scheme == "https" else f"{url.netloc}:{DASHBOARD_PORT}"
    return f"{url.scheme}://{netloc}{url.path.rstrip('/')}"


def check_transport(url: str, insecure_http: bool = False) -> None:
    """The token goes with every request: plain HTTP only to this machine, unless asked."""
    parsed = urlparse(url)
    if parsed.scheme != "http" or insecure_http or _is_loopback(parsed.hostname or ""):
        return
    raise RaysegbgError(
        f"{url} is plain HTTP to another machine, so the cluster's token would cross the "
        "network readable: forward the dashboard's port (`ssh -L 8265:localhost:8265 HEAD`, "
        "then --address http://127.0.0.1:8265), use https://, or pass --insecure-http on a "
        "network you trust"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(url: str, timeout: float = 3.0) -> None:
    """Fail in `timeout` seconds, not minutes, when nothing listens at the dashboard URL."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else DASHBOARD_PORT)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise RaysegbgError(
            f"cannot reach the Ray dashboard at {url} ({exc.strerror or exc}): start the head "
            "(`ray start --head`), forward its port 8265 (`ssh -L 8265:localhost:8265 HEAD` or "
            "`kubectl port-forward svc/HEAD-svc 8265`) and pass --address http://127.0.0.1:8265"
        ) from None


@contextmanager
def _errors(url: str, job_id: str | None = None) -> Iterator[None]:
    """Turn the Jobs client's exceptions into one-line errors that say what to do."""
    from aiohttp import ClientError
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        raise _token_error(url, forbidden="Forbidden" in str(exc)) from None
    except (OSError, ClientError) as exc:  # requests' and aiohttp's connection errors
        if getattr(exc, "status", None) in (401, 403):  # the log tail's websocket handshake
            raise _token_error(url, forbidden=exc.status == 403) from None
        raise RaysegbgError(
            f"the Ray dashboard at {url} did not answer ({exc}): check the head is up and the "
            "URL is its dashboard (port 8265)"
        ) from None
    except RuntimeError as exc:
        text = str(exc).strip() or type(exc).__name__
        if job_id and ("does not exist" in text or "404" in text):
            raise RaysegbgError(
                f"no job {job_id!r} on {url}: `raysegbg jobs --address {url}` lists them"
            ) from None
        raise RaysegbgError(f"the Ray cluster at {url} answered: {text.splitlines()[0]}") from None


def _token_error(url: str, forbidden: bool) -> RaysegbgError:
    problem = "rejected the token" if forbidden else "requires a token"
    return RaysegbgError(f"the Ray cluster at {url} {problem}: {TOKEN_FIX}")


@contextmanager
def _quiet_ray_logs() -> Iterator[None]:
    """Hide Ray's INFO lines about packaging and sockets; the CLI prints its own summary."""
    ray_logger, working_dir = (
        logging.getLogger(name) for name in ("ray", "ray._private.runtime_env.working_dir")
    )
    levels = ray_logger.level, working_dir.level
    ray_logger.setLevel(logging.WARNING)
    working_dir.setLevel(logging.ERROR)  # "'.venv' is now ignored by default": we exclude it
    try:
        yield
    finally:
        ray_logger.setLevel(levels[0])
        working_dir.setLevel(levels[1])


def connect(address: str | None, insecure_http: bool = False) -> Connection:
    """A Jobs API client for the cluster, after the address, transport and token checks."""
    url = dashboard_url(address)
    check_transport(url, insecure_http)
    check_reachable(url)
    from ray.job_submission import JobSubmissionClient

    from raysegbg.environment import environ

    # Ray lets $RAY_ADDRESS override the client's address argument: hide it meanwhile
    with _errors(url), environ(RAY_ADDRESS=None, RAY_API_SERVER_ADDRESS=None):
        try:
            return Connection(url, JobSubmissionClient(url))
        except RuntimeError as exc:  # an HTTP server, but no Jobs API behind it
            raise RaysegbgError(
                f"no Ray dashboard at {url} ({str(exc).splitlines()[0]}): pass the head's "
                "dashboard URL, http://HEAD:8265"
            ) from None


def project_root() -> Path | None:
    """The source checkout holding the package (shipped as working_dir), if there is one."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def build_runtime_env(runtime_env_file: str | None, root: Path | None) -> dict[str, Any]:
    """Ship the project (or the bare package) to the job; a YAML file adds to or overrides it.

    Ray's working_dir plugin puts the shipped folder first on every worker's PYTHONPATH, so the
    shipped code wins over a copy installed in the cluster's image.
    """
    package = Path(__file__).resolve().parent
    env: dict[str, Any] = {"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}, "excludes": list(EXCLUDES)}
    env.update({"working_dir": str(root)} if root else {"py_modules": [str(package)]})
    if not runtime_env_file:
        return env
    extra = _read_yaml(Path(runtime_env_file))
    env["env_vars"].update(extra.pop("env_vars", None) or {})
    env["excludes"] += extra.pop("excludes", None) or []
    env.update(extra)
    return env


def _read_yaml(path: Path) -> dict[str, Any]:
    """A runtime env YAML file, its keys checked against Ray's list before anything is sent."""
    from ray.runtime_env import RuntimeEnv

    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RaysegbgError(
            f"cannot read the runtime env {path} ({exc}): pass a YAML file"
        ) from None
    if not isinstance(values, dict):
        raise RaysegbgError(f"runtime env {path} must be a YAML mapping of Ray runtime_env keys")
    unknown = sorted(set(values) - RuntimeEnv.known_fields)
    if unknown:
        raise RaysegbgError(
            f"runtime env {path} has unknown keys {unknown}: "
            f"valid are {sorted(RuntimeEnv.known_fields)}"
        )
    return values


def submission_id(run_name: str) -> str:
    """Unique per submission, readable, and reusable names: `<run name>-<timestamp>`."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-") or "run"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def submit(
    address: str | None,
    args: list[str],
    run_name: str,
    runtime_env_file: str | None = None,
    insecure_http: bool = False,
) -> Submission:
    """Run `raysegbg ARGS` as a job (ARGS settled by `job_commands.prepare_command`)."""
    runtime_env = build_runtime_env(runtime_env_file, project_root())
    conn = connect(address, insecure_http)
    entrypoint = shlex.join(["python", "-m", "raysegbg.cli", *args])
    with _errors(conn.url), _quiet_ray_logs():
        job_id = conn.client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id(run_name),
            runtime_env=runtime_env,
            metadata={"raysegbg_run": run_name},
        )
    return Submission(job_id, run_name, entrypoint, conn)


def list_jobs(address: str | None, insecure_http: bool = False) -> list[Any]:
    """Every job the cluster knows (ray's JobDetails), oldest first."""
    conn = connect(address, insecure_http)
    with _errors(conn.url):
        jobs = conn.client.list_jobs()
    return sorted(jobs, key=lambda job: job.start_time or 0)


def job_info(conn: Connection, job_id: str) -> Any:
    """The job's JobDetails; an unknown id is a one-line error."""
    with _errors(conn.url, job_id):
        return conn.client.get_job_info(job_id)


def job_logs(conn: Connection, job_id: str) -> str:
    """Everything the job printed so far."""
    job_info(conn, job_id)
    with _errors(conn.url, job_id):
        return conn.client.get_job_logs(job_id)


def follow_logs(conn: Connection, job_id: str, write: Callable[[str], Any]) -> str:
    """Stream the job's logs (the async tail API) until it ends; return its final status."""
    job_info(conn, job_id)

    async def tail() -> None:
        async for chunk in conn.client.tail_job_logs(job_id):
            write(chunk)

    with _errors(conn.url, job_id), _quiet_ray_logs():
        asyncio.run(tail())
        status = str(conn.client.get_job_status(job_id))
        for _ in range(20):  # the tail closes a moment before the status turns final
            if status in TERMINAL:
                break
            time.sleep(0.5)
            status = str(conn.client.get_job_status(job_id))
    return status


def stop_job(conn: Connection, job_id: str) -> bool:
    """Ask the job to stop; False when it had already ended."""
    job_info(conn, job_id)
    with _errors(conn.url, job_id):
        return bool(conn.client.stop_job(job_id))
