"""`raysegbg submit|jobs|status|logs|stop`: run the CLI as Ray jobs on a cluster.

Handlers return an exit code and let `RaysegbgError` propagate; the main CLI prints it as one
line. The Jobs API itself lives in `raysegbg.jobs`.
"""

from __future__ import annotations

import argparse
import sys
import time

from raysegbg import jobs

ENTRY_PREFIX = "python -m raysegbg.cli "


def add_job_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `submit`, `jobs`, `status`, `logs` and `stop`."""
    p = subparsers.add_parser(
        "submit",
        help="run `train` or `tune` as a job on a Ray cluster",
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
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- train|tune [arguments]")
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


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_submit(args: argparse.Namespace) -> int:
    sub = jobs.submit(args.address, args.command, args.name, args.runtime_env)
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
    rows += [_job_row(job) for job in jobs.list_jobs(args.address)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[3][:90]]))
    return 0


def _job_row(job) -> tuple[str, str, str, str]:
    """One line of `raysegbg jobs`: id, status, local start time, shortened entrypoint."""
    start = "-"
    if job.start_time:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000))
    entry = job.entrypoint.replace(ENTRY_PREFIX, "raysegbg ")
    return (job.submission_id or job.job_id or "-", str(job.status), start, entry)


def cmd_status(args: argparse.Namespace) -> int:
    job = jobs.job_info(jobs.connect(args.address), args.job_id)
    run = (job.metadata or {}).get("raysegbg_run", "-")
    print(f"{args.job_id}  {job.status}  run {run}  {job.message or ''}".rstrip())
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    conn = jobs.connect(args.address)
    if not args.follow:
        _write(jobs.job_logs(conn, args.job_id))
        return 0
    status = jobs.follow_logs(conn, args.job_id, _write)
    print(f"job {args.job_id} {status}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    stopped = jobs.stop_job(jobs.connect(args.address), args.job_id)
    print(f"job {args.job_id} " + ("stopping" if stopped else "had already ended"))
    return 0
