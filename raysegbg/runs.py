"""A fresh run from a saved one (`raysegbg train --from-run DIR`).

A run's `config.yaml` holds its name, and training a config that names an existing run
resumes that run. Starting from a saved run therefore drops the name: the new run gets a
generated one, or the `--name` given, which must not be another existing run.
"""

from __future__ import annotations

from raysegbg import storage
from raysegbg.config import Config, check_name, from_dict, replace, to_dict
from raysegbg.errors import RaysegbgError
from raysegbg.storage import Location


def config_from_run(
    run_dir: str | Location, overrides: list[str] | None = None, name: str | None = None
) -> Config:
    """The config of a fresh run made from the saved run `run_dir` (a folder or URI): its
    config.yaml without the run name (`name`, or empty: made up when the run starts), then
    `overrides` (`key=value`, as `--set`)."""
    from raysegbg.checkpoint import run_config  # torch: only when a run is read
    from raysegbg.config import apply_overrides

    run_dir = storage.location(run_dir)
    if not storage.is_file(storage.join(run_dir, "config.yaml")):
        raise RaysegbgError(
            f"--from-run {run_dir} is not a raysegbg run folder (no config.yaml): pass the "
            "folder of a run, <storage_path>/<run name>"
        )
    if name:
        check_name("--name", name)
    saved = replace(run_config(run_dir), logging={"name": name or ""})
    return from_dict(apply_overrides(to_dict(saved), overrides or []))


def check_fresh(cfg: Config, source: str | Location) -> None:
    """Refuse a run name that is already a run folder: `--from-run` starts a new run. The one
    exception is the run this same command started before (its saved config equals `cfg`):
    running the command again after an interruption resumes it, as `--name` would."""
    from raysegbg.checkpoint import run_config
    from raysegbg.ray_train import resolve_run

    if not cfg.logging.name:
        return  # a generated name: a new folder
    resolved = resolve_run(cfg)
    target = storage.join(resolved.logging.storage_path, resolved.logging.name)
    if _same(target, storage.location(source)):
        raise RaysegbgError(
            f"--name {cfg.logging.name} is the run --from-run reads: give the new run another "
            f"name (to resume that run: raysegbg train --name {cfg.logging.name} --config "
            f"{storage.join(source, 'config.yaml')})"
        )
    if not storage.is_file(storage.join(target, "config.yaml")):
        return
    if to_dict(run_config(target)) != to_dict(resolved):
        raise RaysegbgError(
            f"run {target} already exists: pass another --name (or none: one is generated); "
            f"to resume it, run `raysegbg train --config {storage.join(target, 'config.yaml')}`"
        )


def _same(a: Location, b: Location) -> bool:
    if storage.is_uri(a) or storage.is_uri(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return a.expanduser().resolve() == b.expanduser().resolve()
