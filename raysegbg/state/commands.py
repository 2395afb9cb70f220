"""`raysegbg state ls|show|rm`: the stage results stored under a storage path."""

from __future__ import annotations

import argparse
import json
import re
import time

from raysegbg.errors import RaysegbgError
from raysegbg.state.results import list_results, remove_result

KEY = re.compile(r"^[A-Za-z0-9_.-]+$")  # a key never names anything outside its folder


def add_state_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("state", help="stage results shared by runs and trials")
    commands = p.add_subparsers(dest="state_command", required=True)
    for name, helptext, func in (
        ("ls", "list the stored stage results", cmd_ls),
        ("show", "one result's record (config that produced it, producer, users)", cmd_show),
        ("rm", "remove stored results", cmd_rm),
    ):
        c = commands.add_parser(name, help=helptext)
        c.add_argument("--storage", default="runs", help="logging.storage_path (default: runs)")
        if name != "ls":
            c.add_argument("keys", nargs="+" if name == "rm" else None, metavar="KEY")
        c.set_defaults(func=func)


def _find(storage_path: str, key: str) -> dict:
    if not KEY.match(key) or key in (".", ".."):
        raise RaysegbgError(f"'{key}' is not a result key: `raysegbg state ls` lists them")
    for record in list_results(storage_path):
        if record["key"] == key:
            return record
    raise RaysegbgError(
        f"no stage result '{key}' under {storage_path}/stage_results: "
        "`raysegbg state ls --storage PATH` lists them"
    )


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def cmd_ls(args: argparse.Namespace) -> int:
    records = list_results(args.storage)
    if not records:
        print(f"no stage results under {args.storage}/stage_results")
        return 0
    print(f"{'key':<34}{'created':<18}{'size':>10}  users")
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))
        users = ", ".join(r["users"]) or "-"
        print(f"{r['key']:<34}{created:<18}{_size(r['bytes']):>10}  {users}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    print(json.dumps(_find(args.storage, args.keys), indent=1, default=str))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    found = [_find(args.storage, key)["key"] for key in args.keys]  # all checked first
    for key in found:
        remove_result(args.storage, key)
        print(f"removed {key}")
    return 0
