"""Serving configuration: limits, batching, autoscaling, resources (validated; unknown keys fail)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from latentforge.config import StrictConfig

from latentforge.serve.schemas import ServeLimits


class AutoscalingSettings(StrictConfig):
    min_replicas: int = Field(1, ge=0)  # replicas kept when idle
    max_replicas: int = Field(4, ge=1)  # replicas under load
    target_ongoing_requests: float = Field(4.0, gt=0)  # per replica, before Serve adds one
    upscale_delay_s: float = Field(3.0, ge=0)  # how long load must persist before scaling up
    downscale_delay_s: float = Field(30.0, ge=0)  # how long idleness must persist before scaling down
    look_back_period_s: float = Field(10.0, gt=0)  # window the averages are taken over


# The field that asks GPUs for each model deployment's replicas.
GPU_FIELDS = {"Generator": "replica_gpus", "Editor": "editor_gpus"}


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
    # GPUs per Generator replica (0: it runs on its CPUs; a fraction lets replicas share a GPU).
    # Generation and edits of seeds and latents then run on the GPU.
    replica_gpus: float = Field(0.0, ge=0)
    # GPUs per Editor replica: its projections of images (reconstruct, inpaint, denoise, edits and
    # interpolations of images) then run on the GPU, where each of their hundreds of steps is cheap.
    editor_gpus: float = Field(0.0, ge=0)
    threads_per_replica: int = Field(1, ge=1)  # torch threads in each replica
    projection_steps: int = Field(200, ge=1)  # default Adam steps for GAN inversion
    projection_restarts: int = Field(2, ge=1)
    registry_refresh_s: float = Field(2.0, ge=0)  # how long the gateway trusts what it read about a model id
    access_log: bool = True  # a log line per request and per replica call (off: more requests/s on a small machine)
    # The API key: every route but /healthz and the playground page then requires `X-API-Key` (or
    # `Authorization: Bearer`). Give at most one source; all are resolved where the application is
    # built (the driver of `latentforge serve`, or the Serve controller for a config file on a
    # cluster) and reach the gateway replicas inside the deployment's arguments, never its env.
    api_key: SecretStr | None = None  # the key itself (masked when the config is printed)
    api_key_file: str | None = None  # a file holding it, e.g. a mounted Kubernetes Secret
    api_key_env: str | None = None  # an environment variable holding it, e.g. set from a Secret
    request_timeout_s: float = Field(60.0, gt=0, le=3600)  # per request; past it a 504 (a client cannot lift it)
    editor_max_queued: int = Field(16, ge=1)  # edit requests waiting per Editor deployment before 503s
    model_retry_s: float = Field(30.0, ge=0)  # after a model fails to load, 503s without retrying for this long
    model_cache_dir: str | None = None  # where registry URIs are downloaded, a folder per registry (default: a temp folder)
    model_cache_max_gb: float = Field(20.0, gt=0)  # the download cache's bound (least recently used versions go first)
    allow_plugins: list[str] = []  # plug-in architecture modules replicas may import (models.plugins); none by default

    @model_validator(mode="after")
    def _consistent(self):
        if self.limits.max_n > self.max_batch_images:
            raise ValueError(f"limits.max_n ({self.limits.max_n}) is above max_batch_images ({self.max_batch_images}): "
                             "one request could never fit a batch; lower max_n or raise max_batch_images")
        lim = self.limits
        if self.projection_steps > lim.max_projection_steps:
            raise ValueError(f"projection_steps ({self.projection_steps}) is above limits.max_projection_steps "
                             f"({lim.max_projection_steps}): every image request sent without steps would be refused")
        if self.projection_steps * self.projection_restarts > lim.max_projection_work:
            raise ValueError(f"projection_steps x projection_restarts ({self.projection_steps} x {self.projection_restarts}) "
                             f"is above limits.max_projection_work ({lim.max_projection_work}): every image request sent "
                             "without steps would be refused; lower them or raise the limit")
        given = [k for k in ("api_key", "api_key_file", "api_key_env") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of api_key, api_key_file, api_key_env (got {', '.join(given)})")
        return self

    def resolve_api_key(self) -> str | None:
        """The key from whichever source is configured; None for no authentication.

        Raises:
            ValueError: a configured source that is missing or empty (never serve unprotected
                because a Secret failed to mount).
        """
        if self.api_key is not None:
            key = self.api_key.get_secret_value()
            where = "api_key"
        elif self.api_key_file is not None:
            where = f"api_key_file {self.api_key_file}"
            try:
                key = Path(self.api_key_file).read_text(encoding="utf-8")
            except OSError as e:
                raise ValueError(f"{where} cannot be read ({e.strerror}); mount the Secret there or fix the path") from None
        elif self.api_key_env is not None:
            where = f"api_key_env {self.api_key_env}"
            key = os.environ.get(self.api_key_env, "")
        else:
            return None
        key = key.strip()
        if len(key) < 16:
            raise ValueError(f"{where}: the API key is {'empty' if not key else 'shorter than 16 characters'}; "
                             "use a long random key, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        if not key.isascii() or not key.isprintable():
            # HTTP headers arrive as latin-1: a key with other characters could never match
            raise ValueError(f"{where}: the API key must be printable ASCII (it travels in an HTTP header); use e.g. "
                             "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        return key

    def replica_args(self) -> dict:
        """The config as JSON for the deployments' arguments, with the key resolved into it."""
        raw = self.model_dump(mode="json", exclude={"api_key", "api_key_file", "api_key_env"})
        key = self.resolve_api_key()
        if key is not None:
            raw["api_key"] = key
        return raw

    @property
    def editor_concurrency(self) -> int:
        """Requests an Editor replica runs at once: one per CPU it reserves (at least one), since
        each projection keeps a core busy."""
        return max(1, math.floor(self.replica_cpus))

    @field_validator("replica_gpus", "editor_gpus")
    @classmethod
    def _at_most_one(cls, gpus: float) -> float:
        if gpus > 1:
            raise ValueError(f"{gpus:g}: a replica runs its model on one GPU, so the others would sit idle; give at most 1 "
                             "(or a fraction, such as 0.5, for replicas that share a GPU) and more replicas (max_replicas) "
                             "for more GPUs")
        return gpus

    @field_validator("allow_plugins")
    @classmethod
    def _module_names(cls, modules: list[str]) -> list[str]:
        bad = [m for m in modules if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", m)]
        if bad:
            raise ValueError(f"not module names: {bad}; give dotted module paths such as my_package.models")
        return modules
