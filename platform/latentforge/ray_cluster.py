"""Starting or joining a Ray cluster: the one place train, tune, serve and the benchmarks call."""

from __future__ import annotations

import os

# Passed to every Ray worker process.
WORKER_ENV = {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true",
              "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}

# Ray Train V2 reads these in the driver and propagates them: no print patching (it printed
# every progress line twice), no structured worker logging (it echoed every report at INFO).
RAY_DRIVER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                  "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0"}


def ray_init(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (`address`, or RAY_ADDRESS under `ray job submit`) or start a local
    one sized for this machine; nothing happens when Ray is already initialised.

    Locally, more logical CPUs than cores are declared: Train workers and Ray Data tasks would
    otherwise wait on each other forever on a 2-core machine.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")  # set for drivers of `ray job submit`
    for key, value in RAY_DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    from latentforge.host_memory import OPT_OUT

    env_vars = dict(WORKER_ENV)
    if OPT_OUT in os.environ:  # the driver's choice about kept host memory holds in every worker, joined clusters too
        env_vars[OPT_OUT] = os.environ[OPT_OUT]
    runtime_env = {"env_vars": env_vars}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        cpus = num_cpus or max(4, (os.cpu_count() or 2) + 2)
        # The dashboard hosts the state API that Ray Train's controller and cleaner poll.
        ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=runtime_env,
                 object_store_memory=512 * 1024 * 1024, log_to_driver=True)


def check_gpus_for(workers: int, address: str | None = None, log=print, workers_flag: str = "--workers",
                   gpus_flag: str = "--gpus") -> float:
    """After `ray_init`: refuse `workers` GPU workers that this cluster can never place, or say
    that they wait for its autoscaler (`devices.check_cluster_gpus`, `joined_cluster`).

    Returns:
        The GPUs the cluster has now.
    """
    import ray

    from latentforge.devices import check_cluster_gpus

    gpus = float(ray.cluster_resources().get("GPU", 0))
    check_cluster_gpus(workers, gpus, joined=joined_cluster(address), log=log, workers_flag=workers_flag,
                       gpus_flag=gpus_flag)
    return gpus


def joined_cluster(address: str | None) -> bool:
    """Whether `ray_init(address)` joined a cluster (`address`, or RAY_ADDRESS under `ray job
    submit`) rather than starting this machine's own; Ray's "local" is this machine's. A joined
    cluster may grow through its autoscaler, so resources it lacks now are waited for there."""
    return (address or os.environ.get("RAY_ADDRESS") or "local") != "local"
