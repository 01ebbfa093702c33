"""The one way eagle_ray starts or joins Ray: the job, the pool, the chaos run, the benchmarks and the tests.

Joining a cluster (`address`, or RAY_ADDRESS as `ray job submit` sets it) keeps the cluster's own system
config. Starting a local Ray makes a private one (never one another process left running) with the pool's
system config, token authentication chosen explicitly, and the environment and setup hook below for every process
it starts.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import ray

ZERO_COPY_ENV = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}
# Ray frees released objects in batches (by default every 1 s or 100 objects), so a fast stream
# of released shards can sit in the object store well past the pool's byte budget. Free promptly.
# (On a `ray start` cluster pass the same as --system-config.)
RAY_SYSTEM_CONFIG = {"free_objects_period_milliseconds": 20, "free_objects_batch_size": 1}
# A local Ray has no node that can be drained, so Ray Train's preemption watcher has nothing to watch; it is
# also the actor Ray core logs an error about at every start ("constructor arguments in the object store and
# max_restarts > 0"). On a cluster it stays on. Ray Train's controller polls its workers every 2 s by default, so a
# run's start and end are seen up to 2 s late; on one machine a poll is a local call: every 0.5 s.
LOCAL_ENV = {
    **ZERO_COPY_ENV,
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# Run first in every process a local Ray starts (the replicas, Ray Train's controller and workers, data tasks).
LOCAL_SETUP_HOOK = "eagle_ray.ray_init.quiet_local_ray_process"
# Ray Train 2.60's controller registers its workers' resources with the AutoscalingCoordinator (a detached actor of
# Ray Data's that it starts on first use) and waits 5 s for the answer
# (`ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py`). On a loaded machine that
# actor's start-up takes longer, and the controller logs these, with a traceback, which Ray itself calls safe to
# ignore when transient. A local Ray has no autoscaler for the request to reach: nothing to act on.
AUTOSCALING_CLIENT_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
AUTOSCALING_CLIENT_WARNINGS = ("Failed to send resource request for ", "Failed to cancel resource request for ")
# Every Ray Train 2.60 line a local run may print on a loaded machine and has nothing to act on: logger -> message
# prefixes. Besides the autoscaling requests, the controller's teardown: its placement-group cleaner's monitor thread
# missed a stop timeout, or could not query the controller's state meanwhile (a local job's end takes every
# placement group with it).
QUIET_ON_LOCAL_RAY = {
    AUTOSCALING_CLIENT_LOGGER: AUTOSCALING_CLIENT_WARNINGS,
    "ray.train.v2._internal.callbacks.placement_group_callback": ("Failed to stop PlacementGroupCleaner gracefully",),
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": (
        "Monitor thread did not exit within",
        "Failed to query Ray Train Controller actor state",
    ),
}


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    dashboard: bool = True,
    env: dict[str, str] | None = None,
) -> None:
    """Join `address` (None: RAY_ADDRESS, if set), or start a private local Ray sized by the arguments.

    `address="local"` always starts a new local Ray, whatever RAY_ADDRESS says.

    `dashboard`: a local Ray's dashboard serves the State API, which Ray Train's placement-group cleaner polls
    every second (without it, it logs a warning each time); tests that run no Ray Train turn it off.
    """
    quiet_known_warnings()
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        # a job's runtime_env (cluster/runtime_env.yaml) also reaches this driver's environment; adding
        # the same variable again is a conflict Ray refuses
        have = all(os.environ.get(k) == v for k, v in ZERO_COPY_ENV.items())
        runtime_env: dict[str, Any] | None = (
            None if have and not env else {"env_vars": {**ZERO_COPY_ENV, **(env or {})}}
        )
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        return
    _choose_token_auth()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        object_store_memory=object_store_memory,
        include_dashboard=dashboard,
        runtime_env={"env_vars": {**LOCAL_ENV, **(env or {})}, "worker_process_setup_hook": LOCAL_SETUP_HOOK},
        _system_config=dict(RAY_SYSTEM_CONFIG),  # a copy: ray.init adds its spilling config to the dict
        logging_level=logging.WARNING,  # "Started a local Ray instance" and the like
    )


def quiet_known_warnings() -> None:
    """Silence two warnings Ray's zero-copy tensor path gives by design, in this process.

    Ray warns on every serialization that zero-copy is only safe for read-only tensors (ours are: detached
    outputs nobody writes), and torch warns that a tensor over a read-only object-store buffer is read-only
    (that buffer is the zero copy). Called by the driver, each replica and each train worker.
    """
    warnings.filterwarnings("ignore", message="Zero-copy tensor serialization is enabled")
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def quiet_local_ray_process() -> None:
    """A local Ray's `worker_process_setup_hook`: drop the Ray Train lines of `QUIET_ON_LOCAL_RAY` in this process.

    Only those messages of those loggers; every other Ray Train warning still shows. A cluster's processes (joined
    by address) keep them: there an autoscaler may be waiting on the request, and a cleaner may matter.

    It also names this Ray as the process's RAY_ADDRESS: Ray's state API (which Ray Train's placement-group cleaner
    asks) otherwise finds "the" local Ray by scanning processes, and with a second local Ray on the machine it takes
    the newest, printing "Found multiple active Ray instances" and a traceback.
    """
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    for name, prefixes in QUIET_ON_LOCAL_RAY.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in logger.filters):
            logger.addFilter(_Quiet(prefixes))


class _Quiet(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def _choose_token_auth() -> None:
    """Token authentication for a new local Ray, chosen rather than defaulted.

    Ray 2.60 turns it on for a new local cluster when RAY_AUTH_MODE is unset, and warns that it did. Setting the
    variable is how a user chooses; Ray reads it when `ray` is imported, so after the import its own switch
    (the one `ray.init` calls) makes this process and its children see the choice. A user's own RAY_AUTH_MODE
    wins.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()
