"""Ray start-up: connect to ``RAY_ADDRESS`` when it is set, else start a local Ray for this process.

On small machines Ray can hang silently when actors or trainers take every CPU and no CPU is left
for the read tasks, so the local cluster advertises at least 4 logical CPUs and stages ask for
fractional CPUs. The variables every stage's workers need (MLflow, S3) are passed to the workers
explicitly, because a job's workers do not inherit the submitting shell's environment.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Forwarded to every Ray worker when set here.
FORWARD_ENV = (
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "TAMING_LOCAL_DIR",
    "TAMING_FIXTURES",
)


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}


def ensure_ray(num_cpus: int | None = None, include_dashboard: bool = True) -> dict:
    """Initialise Ray once per process; returns the cluster's resources.

    The dashboard stays on by default: Ray Train's controller polls it, and logs an error every few
    seconds where it is missing.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local stack: no token (see shared notes)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": forwarded_env()}
    address = os.environ.get("RAY_ADDRESS")
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
    return ray.cluster_resources()
