"""Serving configuration: limits, batching, autoscaling, resources (validated; unknown keys fail)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from latentforge.config import StrictConfig

from latentforge.serve.schemas import ServeLimits


class AutoscalingSettings(StrictConfig):
    min_replicas: int = Field(1, ge=0)  # replicas kept when idle
    max_replicas: int = Field(4, ge=1)  # replicas under load
    target_ongoing_requests: float = Field(4.0, gt=0)  # per replica, before Serve adds one
    upscale_delay_s: float = Field(3.0, ge=0)  # how long load must persist before scaling up
    downscale_delay_s: float = Field(30.0, ge=0)  # how long idleness must persist before scaling down
    look_back_period_s: float = Field(10.0, gt=0)  # window the averages are taken over


class ServeConfig(StrictConfig):
    """Everything `latentforge serve` and the Serve config YAML can set."""

    registry: str = "registry"  # registry folder or pyarrow URI the model ids resolve in
    limits: ServeLimits = ServeLimits()
    batching: bool = True  # batch generation requests across clients (@serve.batch)
    max_batch_images: int = Field(256, ge=1)  # images per batched forward pass
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # Generator batches of deployment-handle callers: wait to fill
    # (HTTP requests are batched at the gateway without waiting: a batch fills while the last is out)
    max_ongoing_requests: int = Field(64, ge=1)  # per generator replica (caps what a batch can hold)
    generator: AutoscalingSettings = AutoscalingSettings()
    editor: AutoscalingSettings = AutoscalingSettings(max_replicas=2)
    replica_cpus: float = Field(0.5, gt=0)  # CPUs reserved per generator/editor replica
    threads_per_replica: int = Field(1, ge=1)  # torch threads in each replica
    projection_steps: int = Field(200, ge=1)  # default Adam steps for GAN inversion
    projection_restarts: int = Field(2, ge=1)
    registry_refresh_s: float = Field(2.0, ge=0)  # how long the gateway trusts what it read about a model id
    access_log: bool = True  # a log line per request and per replica call (off: more requests/s on a small machine)
    api_key: str | None = None  # if set, /v1/* requires header `X-API-Key` (or `Authorization: Bearer`)
    model_cache_dir: str | None = None  # where registry URIs are downloaded (default: a temp folder)
    allow_plugins: list[str] = []  # plug-in architecture modules replicas may import (models.plugins); none by default

    @field_validator("allow_plugins")
    @classmethod
    def _module_names(cls, modules: list[str]) -> list[str]:
        bad = [m for m in modules if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", m)]
        if bad:
            raise ValueError(f"not module names: {bad}; give dotted module paths such as my_package.models")
        return modules
