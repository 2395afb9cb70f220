"""What every worker process of the local Ray runs at start (`init_ray`'s setup hook): light on
purpose, since every Ray worker process imports it, Train's controller and Ray's own actors
included (`raysegbg.ray_train` would import torch into each of them)."""

from __future__ import annotations

import logging

AUTOSCALER_CLIENT = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"


def quiet_local_worker() -> None:
    """Train's controller asks the cluster's autoscaler for its workers' resources every 20 s
    and logs a warning with a traceback when the answer takes over 5 s (a busy CPU) or Ray is
    stopping (a run interrupted): a local Ray has no autoscaler, so the request has no use and
    that traceback no reader. Errors still show. (A filter, not a level: Train's logging
    setup resets the levels of the loggers under `ray.train` but keeps their filters.)"""
    logging.getLogger(AUTOSCALER_CLIENT).addFilter(lambda record: record.levelno >= logging.ERROR)


SETUP_HOOK = f"{__name__}.{quiet_local_worker.__name__}"  # what `init_ray` names to Ray
