"""`raysegbg submit|jobs|status|logs|stop`: run the CLI as Ray jobs on a cluster.

`submit` settles the command line the job runs (`--name`, `--address auto`, a job-relative
`--config`) and checks the config locally, so a typo fails here and not on the cluster.
Handlers return an exit code and let `RaysegbgError` propagate; the main CLI prints it as one
line. The Jobs API itself lives in `raysegbg.jobs`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from raysegbg import jobs
from raysegbg.config import check_name
from raysegbg.errors import RaysegbgError

ENTRY_PREFIX = "python -m raysegbg.cli "
COMMANDS = ("train", "tune")


def add_job_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `submit`, `jobs`, `status`, `logs` and `stop`."""
    p = subparsers.add_parser(
        "submit",
        help="run `train` or `tune` as a job on a Ray cluster",
        usage="raysegbg submit [--address URL] [--name RUN] [--runtime-env F] [--wait] "
        "-- train|tune [ARGS]",
        description="Ships this project to the cluster and runs `raysegbg COMMAND ...` there. "
        "Re-submitting the same --name resumes that run.",
    )
    _address(p)
    p.add_argument("--name", help="run name (default: <method>-<time>); re-use it to resume")
    p.add_argument("--runtime-env", help="YAML with extra Ray runtime_env keys")
    p.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stream the logs until the job ends (default: print the job id and return)",
    )
    p.add_argument(
        "job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="train|tune [arguments]"
    )
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("jobs", help="list the jobs on a Ray cluster")
    _address(p)
    p.set_defaults(func=cmd_jobs)

    for name, func, text in (
        ("status", cmd_status, "print a job's status"),
        ("logs", cmd_logs, "print a job's logs"),
        ("stop", cmd_stop, "stop a job"),
    ):
        p = subparsers.add_parser(name, help=text)
        p.add_argument("job_id", metavar="JOB", help="the id printed by `raysegbg submit`")
        _address(p)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until it ends")
        p.set_defaults(func=func)


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="the head's dashboard, e.g. http://HEAD:8265 "
        "(default: $RAYSEGBG_ADDRESS, else $RAY_ADDRESS)",
    )
    p.add_argument(
        "--insecure-http",
        action="store_true",
        help="allow a plain-HTTP address on another machine (the token is sent readable)",
    )


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_submit(args: argparse.Namespace) -> int:
    command, run_name = prepare_command(args.job_command, args.name, jobs.project_root())
    sub = jobs.submit(args.address, command, run_name, args.runtime_env, args.insecure_http)
    print(f"submitted job {sub.job_id} (run {sub.run_name}) to {sub.conn.url}")
    print(f"  entrypoint: {sub.entrypoint}")
    if not args.wait:
        print(f"  follow it:  raysegbg logs {sub.job_id} --follow --address {sub.conn.url}")
        print(
            f"  resume it:  raysegbg submit --name {sub.run_name} --address {sub.conn.url} -- ..."
        )
        return 0
    status = jobs.follow_logs(sub.conn, sub.job_id, _write)
    print(f"job {sub.job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    rows = [("JOB", "STATUS", "START", "ENTRYPOINT")]
    rows += [_job_row(job) for job in jobs.list_jobs(args.address, args.insecure_http)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[3][:90]]))
    return 0


def _job_row(job: Any) -> tuple[str, str, str, str]:
    """One line of `raysegbg jobs`: id, status, local start time, shortened entrypoint."""
    start = "-"
    if job.start_time:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000))
    entry = job.entrypoint.replace(ENTRY_PREFIX, "raysegbg ")
    return (job.submission_id or job.job_id or "-", str(job.status), start, entry)


def cmd_status(args: argparse.Namespace) -> int:
    job = jobs.job_info(jobs.connect(args.address, args.insecure_http), args.job_id)
    run = (job.metadata or {}).get("raysegbg_run", "-")
    print(f"{args.job_id}  {job.status}  run {run}  {job.message or ''}".rstrip())
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    conn = jobs.connect(args.address, args.insecure_http)
    if not args.follow:
        _write(jobs.job_logs(conn, args.job_id))
        return 0
    status = jobs.follow_logs(conn, args.job_id, _write)
    print(f"job {args.job_id} {status}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    stopped = jobs.stop_job(jobs.connect(args.address, args.insecure_http), args.job_id)
    print(f"job {args.job_id} " + ("stopping" if stopped else "had already ended"))
    return 0


def _pop_option(args: list[str], flag: str) -> tuple[list[str], str | None]:
    """Remove every `flag VALUE` / `flag=VALUE` from args; return the rest and the last value."""
    rest, value, i = [], None, 0
    while i < len(args):
        if args[i] == flag and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif args[i].startswith(flag + "="):
            value, i = args[i].split("=", 1)[1], i + 1
        else:
            rest, i = [*rest, args[i]], i + 1
    return rest, value


def _ship_path(args: list[str], flag: str, root: Path | None) -> list[str]:
    """Make a local file given to `flag` relative to the shipped project (the job's cwd)."""
    _, value = _pop_option(args, flag)
    if not value or not root or not Path(value).is_file():
        return args  # absent, or a path on the cluster: the job checks it
    path = Path(value).resolve()
    if not path.is_relative_to(root):
        raise RaysegbgError(
            f"{flag} {value} is outside {root}, the folder the job ships: move it into the project"
        )
    return [*_pop_option(args, flag)[0], flag, path.relative_to(root).as_posix()]


def _check_config(args: list[str]) -> str | None:
    """Load the run config as the job will, so a typo fails here; return its method name.

    The job's working dir is a temporary copy without data/ or runs/, so data and storage must
    be absolute (shared) paths or URIs.
    """
    from raysegbg.config import load_config

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--from-run")
    parser.add_argument("--set", action="append", default=[])
    known, _ = parser.parse_known_args(args[1:])
    source = known.config or (known.from_run and str(Path(known.from_run) / "config.yaml"))
    if source and not Path(source).is_file():
        return None  # a path on the cluster (or a URI): the job checks it
    if known.from_run:
        from raysegbg.runs import config_from_run

        cfg = config_from_run(known.from_run, known.set)
    else:
        cfg = load_config(known.config, known.set)
    for key, value in (
        ("data.path", cfg.data.path),
        ("logging.storage_path", cfg.logging.storage_path),
    ):
        if "://" not in value and not Path(value).is_absolute():
            raise RaysegbgError(
                f"{key}={value!r} is relative, but a job runs in a temporary copy of the project "
                f"without data/ and runs/: pass --set {key}=/shared/path (a path every node "
                "mounts, see cluster/README.md)"
            )
    return cfg.method.name


def prepare_command(
    command: list[str], name: str | None, root: Path | None
) -> tuple[list[str], str]:
    """The CLI arguments the job runs (run name settled, `--address auto`) and the run name.

    A search resumed with `tune --resume NAME` keeps that name and gets no `--name`.
    """
    args = command[1:] if command[:1] == ["--"] else list(command)
    if not args or args[0] not in COMMANDS:
        raise RaysegbgError(
            "put the command after `--`: raysegbg submit --address URL -- train --config F ..."
        )
    args, own_name = _pop_option(args, "--name")
    args, own_address = _pop_option(args, "--address")
    if own_address not in (None, "auto"):
        raise RaysegbgError(
            f"drop --address {own_address} after `--`: a job joins the cluster it runs on; "
            "give the cluster to `raysegbg submit --address`"
        )
    resume = _pop_option(args, "--resume")[1] if args[0] == "tune" else None
    for flag, value in (("--name", name), ("--name", own_name), ("--resume", resume)):
        if value is not None:
            check_name(flag, value)
    names = {n for n in (name, own_name, resume) if n}
    if len(names) > 1:
        raise RaysegbgError(f"several run names ({', '.join(sorted(names))}): pass one")
    method = _check_config(args)
    for flag in ("--config", "--space"):
        args = _ship_path(args, flag, root)
    if resume:
        return [*args, "--address", "auto"], resume
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_name = name or own_name or f"{method if args[0] == 'train' and method else args[0]}-{stamp}"
    return [*args, "--name", run_name, "--address", "auto"], run_name
