"""Ray start-up: connect to ``RAY_ADDRESS`` when it is set, else start a local Ray for this process.

On small machines Ray can hang silently when actors or trainers take every CPU and no CPU is left
for the read tasks, so the local cluster advertises at least 4 logical CPUs and stages ask for
fractional CPUs. The variables every stage's workers need (MLflow, S3) are passed to the workers
explicitly, because a job's workers do not inherit the submitting shell's environment.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger(__name__)

# Forwarded to every Ray worker when set here, through the job's runtime_env. Never credentials:
# Ray writes runtime_env variables in clear into its runtime_env_agent.log. A local cluster's workers
# inherit them from the process that starts it; a real cluster's come from the cluster (instance
# roles, the KubeRay Secret every pod reads, the environment its nodes were started with).
FORWARD_ENV = (
    "MLFLOW_TRACKING_URI",  # only without credentials in it (see forwarded_env)
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "TAMING_LOCAL_DIR",
    "TAMING_FIXTURES",
)


# Loggers whose INFO lines are chatter on a console (Ray Data's and Ray Train's progress frames and
# banners, the S3 client's credential notes, matplotlib's font cache): warnings and errors only, in
# the driver and workers.
QUIET_LOGGERS = (
    "ray.data",
    "ray.train",
    "ray.tune",
    "botocore",
    "aiobotocore",
    "s3fs",
    "fsspec",
    "urllib3",
    "matplotlib",
)
# Ray modules whose logger is named by their file path, not their module (so not under "ray.train"):
# the Train worker's "Reporting training result N: TrainingReport(...)" line on every report.
_PATH_NAMED_LOGGERS = ("ray.train.v2._internal.execution.context",)
# Ray Data configures its logger itself when it is imported in a worker (after the setup hook):
# this file keeps its full log in the session's ray-data.log and its console at warnings.
RAY_DATA_LOGGING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")


# Lines Ray's processes print that no user of ours can act on, left off the console (they stay in
# the session's log files, ray_logs_dir()):
UNACTIONABLE = (
    # Ray Train creates its own actors (the TrainController's PreemptionWatcher) with constructor
    # arguments in the object store and max_restarts > 0, and Ray's core worker notes it as an error
    re.compile(
        r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"
    ),
    # the raylet compares worker processes started at once with the CPU count: a stage starting its
    # actors and Ray Train its workers on a small machine exceed it as a matter of course
    re.compile(r"WARNING: \d+ PYTHON worker processes have been started on node"),
)


# the workers' lines as the console shows them, into the command's log file (infra.cli sets its
# handler; without one they go nowhere)
WORKER_LOG = logging.getLogger("taming.workers")
WORKER_LOG.propagate = False


def filter_worker_output() -> None:
    """Leave :data:`UNACTIONABLE` lines off the console and copy the rest into the command's log
    file. Ray prints its workers' output on the driver through the ``ray_print_logs`` handler of
    its stream dispatcher, and the raylet's warnings through ``print_to_stdstream`` (Ray 2.x
    internals): this wraps both; where they are missing, the console stays unfiltered and the log
    file holds the driver's lines alone."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def wrap(handle):
        def filtered(data, *args, **kwargs):
            lines = [x for x in data.get("lines", []) if not any(p.search(x) for p in UNACTIONABLE)]
            if lines:
                handle({**data, "lines": lines}, *args, **kwargs)
                name = data.get("actor_name") or data.get("task_name")
                who = " ".join(str(x) for x in (name, data.get("pid")) if x)
                for x in lines:  # the command's log file holds what the console showed
                    WORKER_LOG.info("(%s) %s", who, x)

        filtered.filtered = True
        return filtered

    for name, handle in list(getattr(dispatcher, "handlers", [])):
        if name == "ray_print_logs" and not getattr(handle, "filtered", False):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, wrap(handle))
    # the raylet's warnings come through Ray's error subscriber, which calls this function directly
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is not None and not getattr(printer, "filtered", False):
        ray_worker.print_to_stdstream = wrap(printer)


class RayDataConsoleFilter(logging.Filter):
    """Drops Ray Data's one console notice that its progress bars are off (the stages turn them off
    and log their own progress)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


def quiet_logging() -> None:
    """Ray's and the S3 clients' INFO chatter down to warnings in this process; every Ray worker
    runs it at start (``worker_process_setup_hook``). The stages' own INFO lines stay."""
    import importlib.util
    import sys
    import warnings

    redact_log_records()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for module in _PATH_NAMED_LOGGERS:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            logging.getLogger(spec.origin).setLevel(logging.WARNING)
    os.environ["RAY_DATA_LOGGING_CONFIG"] = RAY_DATA_LOGGING
    if "ray.data" in sys.modules:  # already configured with Ray's defaults: again with ours
        from ray.data._internal.logging import configure_logging

        configure_logging()
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def ray_logs_dir() -> str | None:
    """Where this process's Ray cluster keeps every worker's full log (on the head node); None
    when Ray was not started."""
    import ray

    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    return os.path.join(ctx.get_temp_dir(), ctx.get_session_name(), "logs")


def forwarded_env() -> dict[str, str]:
    """The variables :data:`FORWARD_ENV` names that are set here, less a tracking URI that carries
    credentials (``http://user:password@host``: the workers take their own)."""
    from infra.storage import redact

    env = {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if redact(uri) != uri:
        del env["MLFLOW_TRACKING_URI"]
        log.info("MLFLOW_TRACKING_URI carries credentials: not forwarded to Ray workers (they use their own)")
    return env


def redact_log_records() -> None:
    """Every log record of this process with the credentials of the URIs in it redacted
    (``infra.storage.redact``), whatever logger or handler it goes through (once per process)."""
    from infra.storage import redact

    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if "://" in str(record.msg) or any("://" in str(a) for a in (record.args or ())):
            text = redact(record.getMessage())
            record.msg, record.args = text, ()
        return record

    factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def node_id() -> str:
    """The Ray node this process runs on (its hex id), or the host name outside Ray."""
    import socket

    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()


def ensure_ray(num_cpus: int | None = None, include_dashboard: bool = True) -> dict:
    """Initialise Ray once per process; returns the cluster's resources.

    The dashboard stays on by default: Ray Train's controller polls it, and logs an error every few
    seconds where it is missing.
    """
    import ray
    import ray.data

    if ray.is_initialized():
        return ray.cluster_resources()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local stack: no token (see shared notes)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    env = forwarded_env()
    if address and address != "auto" and "://" not in address:
        # Ray's own helpers in workers (Ray Train's placement-group cleaner) find the cluster by
        # RAY_ADDRESS, else by looking for one on the machine: with two on one machine (a test's, a
        # `make up` one) they fail with "Found multiple active Ray instances"
        env["RAY_ADDRESS"] = address
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "infra.cluster.quiet_logging"}
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        cpus = num_cpus or max(4, os.cpu_count() or 1)
        log.info("starting a local Ray with %d logical CPUs (set RAY_ADDRESS to use a cluster)", cpus)
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=include_dashboard,
            runtime_env=runtime_env,
            log_to_driver=True,
            configure_logging=False,
        )
    quiet_logging()
    filter_worker_output()
    ctx = ray.data.DataContext.get_current()  # no progress-bar frames: the stages log their progress
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    return ray.cluster_resources()
