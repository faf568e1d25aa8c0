"""The Ray Serve application: a FastAPI gateway (validation, errors, OpenAPI at /docs) in front of
two multiplexed deployments, `Generator` (batched across clients) and `Editor` (iterative
operations: inversion, inpainting, denoising, edits, interpolation), so that slow edits cannot
starve generation. Models are loaded lazily from the registry and evicted LRU.

Run it with `latentforge serve`, `serve run latentforge.serve.app:build_app registry=...`, or
the Serve config / RayService in `cluster/`.
"""

import asyncio
import hmac
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

from fastapi import FastAPI, Request
from fastapi import Path as FastAPIPath
from pydantic import BaseModel
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from latentforge import __version__
from latentforge.registry import (RegistryError, UnknownModel, check_name, entry_version, list_entries, local_checkpoint,
                                  show)
from latentforge.serve.codec import RETRY_AFTER_S, BadInput
from latentforge.serve.config import GPU_FIELDS, AutoscalingSettings, ServeConfig
from latentforge.serve.schemas import EditRequest, GenerateRequest, ImageRequest, InpaintRequest, InterpolateRequest
from latentforge.storage import finite_json

if TYPE_CHECKING:  # engine imports torch; only the replicas that run models load it (in _Models.load)
    from latentforge.serve.engine import ModelRuntime

logger = logging.getLogger("latentforge.serve")


def _autoscaling(a: AutoscalingSettings) -> dict:
    return {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas, "initial_replicas": max(1, a.min_replicas),
            "target_ongoing_requests": a.target_ongoing_requests, "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s, "look_back_period_s": a.look_back_period_s,
            "metrics_interval_s": min(1.0, a.look_back_period_s)}


async def _per_model(items: list, run) -> list:
    """Batch plumbing shared by the gateway and the Generator: `items` are (model_id, request)
    pairs; `run(model_id, requests)` is awaited once per model and returns one result or error
    per request; a failure of the whole call becomes every one of its requests' error. Results
    come back in the order of `items` (errors as values, which @serve.batch hands to callers)."""
    groups = defaultdict(list)
    for i, (model_id, _) in enumerate(items):
        groups[model_id].append(i)
    results: list = [None] * len(items)

    async def one(model_id: str, idx: list[int]):
        try:
            outs = await run(model_id, [items[i][1] for i in idx])
        except Exception as e:  # noqa: BLE001 - e.g. the model failed to load, or the replica died
            outs = [e] * len(idx)
        for i, o in zip(idx, outs):
            results[i] = o

    await asyncio.gather(*(one(m, idx) for m, idx in groups.items()))
    return results


class _Models:
    """Registry loading shared by both deployments (a replica-local LRU via @serve.multiplexed)."""

    def __init__(self, cfg: ServeConfig, directions: bool = False, device: str = "cpu"):
        import torch

        from latentforge.host_memory import keep_freed_host_memory
        from latentforge.models.plugins import allow_plugins

        torch.set_num_threads(cfg.threads_per_replica)
        keep_freed_host_memory()  # each request's tensors reuse the last one's pages (host_memory.py)
        allow_plugins(cfg.allow_plugins)  # only these: a registry entry naming any other module is refused
        self.cfg, self.directions, self.device = cfg, directions, device
        self.failed: dict[str, float] = {}  # model id -> when its load last failed (a negative cache)
        self.resident: set[str] = set()  # ids the multiplexed cache holds (added by `take`, dropped on eviction)
        self.staged: dict[str, object] = {}  # loaded, not yet handed to the cache
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        from ray.util.metrics import Counter

        self.loads = Counter("latentforge_serve_model_loads", "Models loaded into a replica", tag_keys=("model",))

    def check_loadable(self, model_id: str) -> None:
        """Before the multiplexed cache is touched: a model whose load failed in the last
        `model_retry_s` is answered 503 at once, never retried in a loop, and never evicts a
        healthy model to make room for another failure."""
        when = self.failed.get(model_id)
        if when is not None and time.monotonic() - when < self.cfg.model_retry_s:
            raise _unavailable(model_id, self.cfg.model_retry_s - (time.monotonic() - when))

    async def runtime(self, model_id: str, get_model):
        """The loaded model, through the replica's multiplexed cache (`get_model`). Ray's cache
        evicts its least recently used model before it calls the loader, so a model that is not
        resident is loaded here first: one that fails to load answers 503 and evicts nothing."""
        self.check_loadable(model_id)
        if model_id not in self.resident:
            async with self._locks[model_id]:  # concurrent first requests load it once
                if model_id not in self.resident and model_id not in self.staged:
                    self.staged[model_id] = await asyncio.to_thread(self.load, model_id)
        return await get_model(model_id)

    def take(self, model_id: str):
        """The multiplexed loader: the staged model if there is one, else a load now. The cache
        calls the returned runtime's `__del__` when it evicts it, which drops it from `resident`."""
        runtime = self.staged.pop(model_id, None) or self.load(model_id)
        runtime.__del__ = lambda: self.resident.discard(model_id)
        self.resident.add(model_id)
        return runtime

    def load(self, model_id: str):
        """`model_id` as routed: 'name@version' from the gateway (`_routed`), or a bare name."""
        from latentforge.serve.engine import ModelRuntime

        name = model_name(model_id)
        check_name(name)  # an invalid id: the gateway's 400
        try:
            path = local_checkpoint(self.cfg.registry, name, self.cfg.model_cache_dir,
                                    max_bytes=int(self.cfg.model_cache_max_gb * 2**30))
            runtime = ModelRuntime(name, path, self.cfg.limits, self.cfg.projection_steps, self.cfg.projection_restarts,
                                   device=self.device)
        except UnknownModel:
            raise  # the gateway's 404
        # a damaged entry or download (a file missing, a hash mismatch), corrupt weights, a refused
        # plug-in, storage down: the server's fault, not the client's. The details (which name the
        # registry's location) go to the log, and the failure is remembered: a broken entry is not
        # downloaded again on every request.
        except Exception:  # noqa: BLE001
            logger.exception("loading model %s failed", model_id)
            self.failed[model_id] = time.monotonic()
            raise _unavailable(model_id, self.cfg.model_retry_s) from None
        self.failed.pop(model_id, None)
        if self.directions:  # the Editor's: read them, or compute missing ones off the request path
            runtime.prepare_directions(background=True)
        self.loads.inc(tags={"model": name})
        return runtime


def replica_device(cfg: ServeConfig, deployment: str) -> str:
    """Where a model replica ('Generator' or 'Editor') runs its models: 'cuda' when its GPU field
    asks for GPUs (Ray has given the replica its share; TF32 off, so a seed's images match the
    CPU's fp32 math as closely as `generate --device cuda`'s do), else 'cpu'.

    Raises:
        ConfigError: GPUs asked for in a replica that sees no CUDA device.
    """
    from latentforge.devices import inference_device

    field = GPU_FIELDS[deployment]
    return inference_device("cuda" if getattr(cfg, field) else "cpu", field, f"set {field}: 0 to serve on CPUs")


def replica_options(cfg: ServeConfig, deployment: str) -> dict:
    """A model replica's Ray resources: `replica_cpus`, and its deployment's GPU field."""
    gpus = getattr(cfg, GPU_FIELDS[deployment])
    return {"num_cpus": cfg.replica_cpus, **({"num_gpus": gpus} if gpus else {})}


def model_name(routed: str) -> str:
    """The registry name of a routed model id ('name@version', `Gateway._routed`)."""
    return routed.partition("@")[0]


def _unavailable(model_id: str, retry_in_s: float) -> BadInput:
    return BadInput(f"model {model_name(model_id)!r} is unavailable: it failed to load on this server (the server log has "
                    f"details); it is tried again in {max(1, round(retry_in_s))} s", status=503)


@serve.deployment(name="Generator")
class Generator:
    def __init__(self, cfg: dict):
        self.cfg = ServeConfig.model_validate(cfg)
        # it also runs edits of seeds and latents
        self.models = _Models(self.cfg, directions=True, device=replica_device(self.cfg, "Generator"))
        from ray.util.metrics import Counter, Histogram

        self.batch_images = Histogram("latentforge_serve_batch_images", "Images per generation forward pass",
                                      boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512], tag_keys=("model",))
        self.images = Counter("latentforge_serve_images", "Images generated", tag_keys=("model",))
        self._batched.set_max_batch_size(self.cfg.max_batch_images)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str):
        return await asyncio.to_thread(self.models.take, model_id)

    def _run(self, runtime, requests):
        results = runtime.generate_each(requests)
        n = sum(r.n for r, res in zip(requests, results) if not isinstance(res, BaseException))
        if n:  # a batch of only bad requests generated nothing (and a Ray Counter refuses to add 0)
            self.batch_images.observe(n, tags={"model": runtime.name})
            self.images.inc(n, tags={"model": runtime.name})
        return results

    def _run_safely(self, runtime, requests) -> list:
        """One forward pass for all; if one request is bad, the others must not fail with it:
        retry one by one, and the bad one gets its error (returned, not raised)."""
        try:
            return self._run(runtime, requests)
        except BadInput:
            out = []
            for r in requests:
                try:
                    out.append(self._run(runtime, [r])[0])
                except Exception as e:  # noqa: BLE001 - handed back to that request's caller
                    out.append(e)
            return out

    async def generate(self, model_id: str, request: dict) -> dict:
        """One request (handle callers; the gateway when batching is off). A result or an error."""
        req = GenerateRequest.model_validate(request)
        if self.cfg.batching:
            return await self._batched((model_id, req))
        runtime = await self.models.runtime(model_id, self.get_model)
        return (await asyncio.to_thread(self._run_safely, runtime, [req]))[0]

    async def _generate_batch(self, model_id: str, requests: list[GenerateRequest]) -> list:
        runtime = await self.models.runtime(model_id, self.get_model)
        return await asyncio.to_thread(self._run_safely, runtime, requests)

    async def generate_many(self, model_id: str, requests: list[dict]) -> list:
        """A batch the gateway already collected: one forward pass, one result or error each."""
        return await self._generate_batch(model_id, [GenerateRequest.model_validate(r) for r in requests])

    async def directions(self, model_id: str) -> dict:
        """The model's edit directions (this replica prepares them for the edits it runs)."""
        runtime = await self.models.runtime(model_id, self.get_model)
        return runtime.directions_info()

    async def ready(self, model_id: str) -> bool:
        """Readiness: `model_id` is loaded (or loads now) on this replica."""
        await self.models.runtime(model_id, self.get_model)
        return True

    async def latent_op(self, model_id: str, op: str, body: "EditRequest | InterpolateRequest") -> dict:
        """An edit or interpolation whose sources are seeds or latents: a forward pass of a few
        images, like generation, with nothing to invert. It runs here rather than in the Editor's
        queue, where one slot per reserved CPU is kept for projections that take seconds."""
        if op not in ("edit", "interpolate"):
            raise ValueError(f"not a latent operation: {op!r}")
        runtime = await self.models.runtime(model_id, self.get_model)
        return await asyncio.to_thread(getattr(runtime, op), body)

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.01, batch_size_fn=lambda items: sum(r.n for _, r in items))
    async def _batched(self, items: list) -> list:
        """One forward pass per model for everything that arrived together (handle callers)."""
        return await _per_model(items, self._generate_batch)


@serve.deployment(name="Editor")
class Editor:
    def __init__(self, cfg: dict):
        self.cfg = ServeConfig.model_validate(cfg)
        self.models = _Models(self.cfg, directions=True, device=replica_device(self.cfg, "Editor"))

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str):
        return await asyncio.to_thread(self.models.take, model_id)

    async def _on_model(self, model_id: str, op: "Callable[[ModelRuntime], dict]") -> dict:
        """Load (or reuse) `model_id`, then run `op` on it in a thread: inversion and inpainting
        take seconds, and the replica's event loop must keep accepting requests meanwhile."""
        runtime = await self.models.runtime(model_id, self.get_model)
        stop = threading.Event()
        deadline = time.monotonic() + self.cfg.request_timeout_s

        def run():
            with runtime.stoppable(lambda: stop.is_set() or time.monotonic() > deadline, self.cfg.request_timeout_s):
                return op(runtime)

        try:
            return await asyncio.to_thread(run)
        finally:  # also when cancelled (the client left, the gateway timed out): the projection stops
            stop.set()

    # One method per operation; the gateway hands over request bodies it has already validated.
    async def reconstruct(self, model_id: str, body: ImageRequest) -> dict:
        """Invert an image to a latent and decode it again (the reconstruction, its latent and error)."""
        return await self._on_model(model_id, lambda m: m.reconstruct(body))

    async def interpolate(self, model_id: str, body: InterpolateRequest) -> dict:
        """Images along the path between two latents (seeds, images or raw latents)."""
        return await self._on_model(model_id, lambda m: m.interpolate(body))

    async def edit(self, model_id: str, body: EditRequest) -> dict:
        """Move a latent along one of the model's saved directions."""
        return await self._on_model(model_id, lambda m: m.edit(body))

    async def inpaint(self, model_id: str, body: InpaintRequest) -> dict:
        """Fill the masked region of an image."""
        return await self._on_model(model_id, lambda m: m.inpaint(body))

    async def denoise(self, model_id: str, body: ImageRequest) -> dict:
        """Remove noise from an image (weighted towards the model's reconstruction)."""
        return await self._on_model(model_id, lambda m: m.denoise(body))



# ------------------------------------------------------------------------------------------ gateway
app = FastAPI(title="LatentForge", version=__version__,
              description="Generation and editing with GANs and VAEs from the LatentForge registry.")


class _HTTPError(Exception):
    """A gateway-side error with its HTTP status (defined before the deployments: Serve pickles
    the ingress class when it is decorated, with the globals that exist then)."""
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ErrorBody(BaseModel):
    """The one shape of every error the API answers."""

    error: str


_STATUS_TEXT = {400: "an invalid model id", 401: "a missing or wrong API key (when the server has one)",
                404: "no such model or route", 413: "a body or image over the size limit",
                422: "a request that is not valid: the message names the field",
                429: "over the per-client request rate (when the server has one); see Retry-After",
                503: "busy (a full queue), a model that failed to load, or directions being computed; see Retry-After",
                504: "past the server's deadline"}


def _errors(*statuses: int) -> dict:
    """OpenAPI `responses` for these error statuses, all with the error schema."""
    return {s: {"model": ErrorBody, "description": _STATUS_TEXT[s]} for s in statuses}


MODEL_ERRORS = _errors(400, 401, 404, 413, 422, 429, 503, 504)  # every /v1/models/{model_id}/... route
ModelId = Annotated[str, FastAPIPath(description="a registry model name",
                                     json_schema_extra={"pattern": "^[a-z0-9][a-z0-9._-]{0,63}$", "maxLength": 64})]


def _error(status: int, message: str) -> JSONResponse:
    """Every error the API answers has this one shape: {"error": message}."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="latentforge"'
    return JSONResponse(status_code=status, content={"error": message}, headers=headers or None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """Unknown routes (404), wrong methods (405) and the like, in the API's error shape."""
    message = {404: f"no route {request.url.path[:200]!r}; the API is under /v1 (see /docs)",
               405: f"method {request.method} is not allowed on {request.url.path[:200]!r}"}.get(exc.status_code, str(exc.detail))
    status = exc.status_code
    if status == 400 and exc.detail == "There was an error parsing the body":
        # FastAPI's answer when the JSON decoder itself fails (an integer of thousands of digits,
        # arrays nested past the recursion limit): a malformed body, as every other one is 422
        status, message = 422, "the request body is not JSON this API reads (not UTF-8, a number too long, or nesting too deep)"
    response = _error(status, message)
    for k, v in (exc.headers or {}).items():
        response.headers[k] = v
    return response


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    problems = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        problems.append(f"{loc}: {e.get('msg')}" if loc else e.get("msg"))
    return _error(422, "; ".join(problems) or "invalid request")


def _unwrap(exc: BaseException) -> BaseException:
    """Errors raised in a deployment arrive wrapped (RayTaskError); find the original."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class BodyLimit:
    """ASGI middleware: refuse bodies over the limit (413) without reading them whole.

    The limit is a class attribute that the Gateway replica sets from its config. (Serve pickles
    the Gateway class by value with copies of the module globals it uses, so a module-level dict
    written there is not the one this middleware reads; a class importable by name is shared.)"""

    max_bytes = 4 * 1024 * 1024

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            resp = _error(413, f"request body is {int(length)} bytes; the limit is {self.max_bytes}")
            return await resp(scope, receive, send)
        chunked = b"chunked" in dict(scope.get("headers") or []).get(b"transfer-encoding", b"").lower()
        if not chunked:  # a sized body is held to its length by the server; without either, there is none
            return await self.inner(scope, receive, send)
        # chunked: read up to the limit here (the app reads it whole anyway), 413 past it, then replay
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.inner(scope, _replay([message]), send)  # e.g. the client left
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await _error(413, f"request body is over the limit of {self.max_bytes} bytes")(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        return await self.inner(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                                               receive), send)


def _replay(messages: list, then=None):
    """An ASGI receive that hands out `messages`, then defers to `then` (disconnect notices)."""
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}
    return receive


PUBLIC_PATHS = frozenset({"/healthz", "/"})  # /readyz too asks for the key: it counts the models  # liveness and the playground page itself (it asks for the key)


def presented_key(headers: dict) -> str | None:
    """The key a request carries: `X-API-Key`, or `Authorization: Bearer KEY` (scheme in any case)."""
    key = headers.get(b"x-api-key")
    if key is not None:
        return key.decode("latin-1").strip()
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class ApiKeyAuth:
    """ASGI middleware, outermost: with a key configured, every route but the public ones answers
    401 before anything else runs (body limits, validation, model lookups tell a stranger nothing).
    The key is a class attribute the Gateway replica sets (see BodyLimit on why not a global)."""

    key: str | None = None

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        key = ApiKeyAuth.key
        if scope["type"] == "http" and key and scope.get("path") not in PUBLIC_PATHS:
            given = presented_key(dict(scope.get("headers") or []))
            if given is None or not hmac.compare_digest(given.encode(), key.encode()):
                resp = _error(401, "missing or wrong API key: send it in the X-API-Key header (or Authorization: Bearer)")
                return await resp(scope, receive, send)
        return await self.inner(scope, receive, send)


class TokenBuckets:
    """Per-client token buckets: `rate` tokens a second up to `burst`; a request takes one. At most
    `max_clients` are tracked (the longest idle goes first), so a flood of addresses cannot grow it."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000, clock=time.monotonic):
        self.rate, self.burst, self.max_clients, self.clock = rate, burst, max_clients, clock
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)

    def take(self, client: str) -> float:
        """0 when the request may go ahead (a token is taken), else the seconds until it could."""
        now = self.clock()
        tokens, when = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.rate)
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
        self.buckets[client] = (tokens - 1.0 if wait == 0.0 else tokens, now)  # re-inserted: most recent last
        while len(self.buckets) > self.max_clients:
            self.buckets.pop(next(iter(self.buckets)))
        return wait


class RateLimit:
    """ASGI middleware: a 429 with Retry-After past a client's rate (`ServeLimits.rate_per_s`),
    before a body is read or a model looked up. Per gateway replica: with N replicas a client
    gets up to N times the rate. The settings are class attributes (see BodyLimit on why)."""

    buckets: TokenBuckets | None = None
    trust_forwarded_for = False

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        buckets = RateLimit.buckets
        if scope["type"] == "http" and buckets is not None and scope.get("path") not in PUBLIC_PATHS:
            wait = buckets.take(client_of(scope, RateLimit.trust_forwarded_for))
            if wait > 0:
                resp = _error(429, f"too many requests: this server allows {buckets.rate:g} a second per client "
                                   f"(bursts of {buckets.burst}); retry in {math.ceil(wait)} s")
                resp.headers["Retry-After"] = str(math.ceil(wait))
                return await resp(scope, receive, send)
        return await self.inner(scope, receive, send)


def client_of(scope, trust_forwarded_for: bool) -> str:
    """Who a request counts against: its peer address, or the first X-Forwarded-For address."""
    if trust_forwarded_for:
        forwarded = dict(scope.get("headers") or []).get(b"x-forwarded-for", b"").decode("latin-1")
        first = forwarded.split(",")[0].strip()
        if first:
            return first[:64]
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


app.add_middleware(BodyLimit)
app.add_middleware(RateLimit)  # after the key check: a stranger without the key gets 401s, never tokens
app.add_middleware(ApiKeyAuth)  # added last: runs first


def _openapi() -> dict:
    """FastAPI's document plus how to authenticate: the key's two headers as security schemes,
    required on every route but the public ones (a server started without a key ignores them)."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        doc.setdefault("components", {})["securitySchemes"] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "bearer": {"type": "http", "scheme": "bearer"},
        }
        for path, operations in doc.get("paths", {}).items():
            for op in operations.values():
                op["security"] = [] if path in PUBLIC_PATHS else [{"apiKey": []}, {"bearer": []}]
        app.openapi_schema = doc
    return app.openapi_schema


app.openapi = _openapi


def _awaited(awaitable):
    async def wait():
        return await awaitable
    return wait()


def public_lineage(lineage: dict) -> dict:
    """A registry entry's lineage without where things lie on the server (checkpoint folders, run
    folders, storage URIs): the sweep, trial, hyperparameters and hashes stay."""
    def private(v) -> bool:
        return isinstance(v, str) and (v.startswith(("/", "~", "\\")) or "://" in v or ":\\" in v)
    return {k: v for k, v in lineage.items() if k != "source_checkpoint" and not private(v)}


@serve.deployment(name="Gateway")
@serve.ingress(app)
class Gateway:
    def __init__(self, generator, editor, cfg: dict):
        self.cfg = ServeConfig.model_validate(cfg)
        self.generator, self.editor = generator, editor
        # the key arrives resolved in the deployment's arguments (ServeConfig.replica_args); this
        # replica's own environment is never consulted: on a cluster it is not the user's
        ApiKeyAuth.key = self.cfg.api_key.get_secret_value() if self.cfg.api_key else None
        BodyLimit.max_bytes = self.cfg.limits.max_body_bytes
        lim = self.cfg.limits
        RateLimit.buckets = TokenBuckets(lim.rate_per_s, lim.rate_burst) if lim.rate_per_s else None
        RateLimit.trust_forwarded_for = lim.trust_forwarded_for
        self._forward.set_max_batch_size(self.cfg.max_batch_images)
        self._entries: dict[str, tuple[float, dict | tuple[int, str]]] = {}

    async def _entry(self, model_id: str) -> dict:
        """The registry entry of `model_id`, or a 404/400. Answers (unknown ids too) are kept for
        `registry_refresh_s`: reading the registry on every request cost a file read here and a
        round trip to object storage on a cluster, and a flood of unknown ids rescanned it. Only
        a stale answer is read again, in a thread (registry I/O never runs on the event loop)."""
        hit = self._entries.get(model_id)
        if hit is None or time.monotonic() - hit[0] >= self.cfg.registry_refresh_s:
            hit = await asyncio.to_thread(self._read_entry, model_id)
        if isinstance(hit[1], tuple):
            raise _HTTPError(*hit[1])
        return hit[1]

    def _read_entry(self, model_id: str) -> tuple:
        try:
            check_name(model_id)
        except RegistryError as e:  # the id itself: the client's mistake, named
            answer: dict | tuple[int, str] = (400, str(e))
        else:
            try:  # one read: an unknown id must not cost a read of every entry
                answer = show(self.cfg.registry, model_id, list_known=False)
            except UnknownModel:  # neither the registry's location nor the other models' names
                answer = (404, f"no model {model_id!r}; GET /v1/models lists the models")
            except RegistryError as e:  # a damaged entry: the operator's to fix; its location stays in the log
                logger.warning("model %s is unavailable: %s", model_id, e)
                answer = (503, f"model {model_id!r} is unavailable: its registry entry is damaged (the server log "
                               "has details)")
            except Exception:  # noqa: BLE001 - storage down or unreachable: a 503 to retry, not a 500
                logger.exception("reading the registry entry of %s failed", model_id)
                answer = (503, "the model registry cannot be read right now (the server log has details); retry shortly")
        while len(self._entries) >= 1024:  # hostile ids cannot grow it without bound: the oldest answer goes
            self._entries.pop(next(iter(self._entries)))
        self._entries.pop(model_id, None)
        hit = self._entries[model_id] = (time.monotonic(), answer)
        return hit

    async def _call(self, request: Request, model_id: str, coro_factory):
        from ray.serve.exceptions import BackPressureError

        deadline = time.monotonic() + self.cfg.request_timeout_s + 5
        try:
            try:  # storage may hang: the entry read shares the request's deadline
                entry = await asyncio.wait_for(self._entry(model_id), self.cfg.request_timeout_s)
            except TimeoutError:
                return _error(503, "the model registry did not answer in time; retry shortly")
            # routed by name and entry version: a replica holding an older copy of a re-promoted
            # model loads the new one instead of serving the old weights from its cache
            routed = f"{model_id}@{entry_version(entry)}"
            # the replica stops its own work at the deadline; this bounds queueing and loading too
            result = await asyncio.wait_for(_awaited(coro_factory(routed)), max(1.0, deadline - time.monotonic()))
            if isinstance(result, BaseException):  # a batched call hands errors back as values
                raise result
        except _HTTPError as e:
            return _error(e.status, e.message)
        except TimeoutError:
            return _error(504, f"the request took longer than the server's deadline of {self.cfg.request_timeout_s:g} s")
        except Exception as e:  # noqa: BLE001 - every failure becomes a clear JSON error
            err = _unwrap(e)
            if isinstance(err, BadInput):
                return _error(err.status, str(err))
            if isinstance(err, BackPressureError):
                return _error(503, "the server is busy (its queue for this kind of request is full); retry shortly")
            if isinstance(err, UnknownModel):
                return _error(404, f"no model {model_id!r}; GET /v1/models lists the models")
            if isinstance(err, RegistryError):  # what reaches here is an invalid id (check_name)
                return _error(400, str(err))
            logger.exception("request failed")
            return _error(500, f"internal error ({type(err).__name__}); the server log has details")
        if "image/png" in request.headers.get("accept", "") and len(result.get("images", [])) == 1:
            import base64

            headers = {k: str(result[k]) for k in ("seed", "model") if result.get(k) is not None}
            return Response(base64.b64decode(result["images"][0]), media_type="image/png",
                            headers={f"x-latentforge-{k}": v for k, v in headers.items()})
        return result

    @app.get("/", include_in_schema=False)
    async def playground(self):
        """The editing playground: one self-contained page (no CDN), calling the API above."""
        from importlib import resources

        from fastapi.responses import HTMLResponse

        return HTMLResponse(resources.files("latentforge.serve").joinpath("static/playground.html").read_text("utf-8"))

    @app.get("/healthz")
    async def healthz(self):
        """Liveness: the gateway answers."""
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", responses=_errors(401, 503))
    async def readyz(self):
        """Readiness: the registry can be read and a model loads on a Generator replica (the
        first of the registry's models that does; once loaded it stays resident, so later
        probes cost a cache hit). An empty registry is ready: there is nothing to load yet."""
        try:
            entries = await asyncio.to_thread(list_entries, self.cfg.registry)
        except Exception as e:  # noqa: BLE001 - storage down, permissions: not ready
            logger.warning("registry unreadable: %s", e)
            return _error(503, "not ready: the model registry cannot be read (the server log has details)")
        for entry in entries[:3]:
            name = entry["name"]
            routed = f"{name}@{entry_version(entry)}"  # as requests route it: the probe reuses their copy
            try:
                await asyncio.wait_for(_awaited(self.generator.options(multiplexed_model_id=routed).ready.remote(routed)),
                                       self.cfg.request_timeout_s)
            except Exception as e:  # noqa: BLE001 - a broken entry or a timeout: try the next one
                logger.warning("readiness: model %s does not load: %s", name, type(_unwrap(e)).__name__)
                continue
            return {"status": "ready", "models": len(entries), "loaded": name}
        if entries:
            return _error(503, "not ready: none of the registry's first models loads (the server log has details)")
        return {"status": "ready", "models": 0, "loaded": None}

    def check_health(self):
        """Serve's replica health check (every 10 s): the registry's root must be reachable (one
        metadata call, not a read of every entry)."""
        from latentforge.storage import resolve_filesystem

        fs, root = resolve_filesystem(self.cfg.registry)
        fs.get_file_info(root)

    @app.get("/v1/models", responses=_errors(401))
    async def models(self, request: Request):
        try:
            entries = await asyncio.to_thread(list_entries, self.cfg.registry)
        except Exception:  # noqa: BLE001 - storage down or the registry path wrong: the details go to the log
            logger.exception("listing the registry failed")
            return _error(503, "the model registry cannot be read right now (the server log has details); retry shortly")
        # an entry promoted before metrics were stored as JSON may hold NaN: null here, or the
        # whole list (and the playground) fails for every client
        return finite_json({"models": [{"id": e["name"], "kind": e["algorithm"], "dataset": e.get("dataset_hash"),
                                        "image_shape": e.get("image_shape"), "num_classes": e.get("num_classes"),
                                        "latent_prior": e.get("latent_prior", "standard"),
                                        # the size and space of the latents the API takes and returns
                                        "z_dim": e.get("z_dim"), "latent_space": e.get("latent_space", "z"),
                                        "class_names": e.get("class_names"), "metrics": e.get("metrics", {}),
                                        "supports": e.get("capabilities", []),
                                        "lineage": public_lineage(e.get("lineage", {}))}
                                       for e in entries]})

    def _editor(self, model_id: str):
        """The Editor handle routed to a replica that has (or will load) `model_id`; call one of
        its typed operations on it, e.g. `self._editor(m).reconstruct.remote(m, body)`."""
        return self.editor.options(multiplexed_model_id=model_id)

    @app.get("/v1/models/{model_id}/directions", responses=MODEL_ERRORS)
    async def directions(self, model_id: ModelId, request: Request):
        # the Generator's: a metadata read must not queue behind the Editor's projections
        return await self._call(request, model_id, lambda m: self.generator.options(
            multiplexed_model_id=m).directions.remote(m))

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.0, max_concurrent_batches=2,
                 batch_size_fn=lambda items: sum(body["n"] for _, body in items))
    async def _forward(self, items: list) -> list:
        """Batching starts here, at the ingress: the generate requests that arrived while the last
        batch was out go to the Generator as one call per model. A call per request cost the
        Generator's event loop more than the forward pass of a small model; the Generator runs
        each batch as one forward pass. No wait: under load the queue fills while a batch is out,
        and a lone request goes at once. Two batches in flight keep the Generator busy while the
        gateway encodes the last answers."""
        return await _per_model(items, lambda model_id, bodies: self.generator.options(
            multiplexed_model_id=model_id).generate_many.remote(model_id, bodies))

    def _generate(self, model_id: str, body: dict):
        if self.cfg.batching:
            return self._forward((model_id, body))
        return self.generator.options(multiplexed_model_id=model_id).generate.remote(model_id, body)

    @app.post("/v1/models/{model_id}/generate", responses=MODEL_ERRORS)
    async def generate(self, model_id: ModelId, body: GenerateRequest, request: Request):
        if body.n > self.cfg.limits.max_n:
            return _error(422, f"n: {body.n} is above the limit of {self.cfg.limits.max_n} images per request")
        return await self._call(request, model_id, lambda m: self._generate(m, body.model_dump()))

    @app.post("/v1/models/{model_id}/reconstruct", responses=MODEL_ERRORS)
    async def reconstruct(self, model_id: ModelId, body: ImageRequest, request: Request):
        return await self._call(request, model_id, lambda m: self._editor(m).reconstruct.remote(m, body))

    def _latent_op(self, model_id: str, op: str, body, sources: list):
        """Work that inverts an image goes to the Editor (bounded queue, one projection per
        reserved CPU); the same operation on seeds or latents is a forward pass and goes to the
        Generator, so cheap edits never wait behind projections."""
        if any(src.image is not None for src in sources):
            return getattr(self._editor(model_id), op).remote(model_id, body)
        return self.generator.options(multiplexed_model_id=model_id).latent_op.remote(model_id, op, body)

    @app.post("/v1/models/{model_id}/interpolate", responses=MODEL_ERRORS)
    async def interpolate(self, model_id: ModelId, body: InterpolateRequest, request: Request):
        return await self._call(request, model_id, lambda m: self._latent_op(m, "interpolate", body, [body.a, body.b]))

    @app.post("/v1/models/{model_id}/edit", responses=MODEL_ERRORS)
    async def edit(self, model_id: ModelId, body: EditRequest, request: Request):
        return await self._call(request, model_id, lambda m: self._latent_op(m, "edit", body, [body.source]))

    @app.post("/v1/models/{model_id}/inpaint", responses=MODEL_ERRORS)
    async def inpaint(self, model_id: ModelId, body: InpaintRequest, request: Request):
        return await self._call(request, model_id, lambda m: self._editor(m).inpaint.remote(m, body))

    @app.post("/v1/models/{model_id}/denoise", responses=MODEL_ERRORS)
    async def denoise(self, model_id: ModelId, body: ImageRequest, request: Request):
        return await self._call(request, model_id, lambda m: self._editor(m).denoise.remote(m, body))


def build_application(cfg: ServeConfig):
    """The bound Serve application for a config. The API key is resolved here (ValueError if a
    configured source is missing) and travels in the deployments' arguments."""
    raw = cfg.replica_args()
    logs = {"enable_access_log": cfg.access_log}
    generator = Generator.options(
        ray_actor_options=replica_options(cfg, "Generator"), autoscaling_config=_autoscaling(cfg.generator),
        max_ongoing_requests=cfg.max_ongoing_requests, logging_config=logs,
    ).bind(raw)
    editor = Editor.options(ray_actor_options=replica_options(cfg, "Editor"), autoscaling_config=_autoscaling(cfg.editor),
                            max_ongoing_requests=cfg.editor_concurrency, max_queued_requests=cfg.editor_max_queued,
                            logging_config=logs).bind(raw)
    return Gateway.options(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256,
                           logging_config=logs).bind(generator, editor, raw)


def build_app(args: dict):
    """Application builder for `serve run latentforge.serve.app:build_app registry=DIR ...` and
    Serve config files (`args:` holds ServeConfig fields)."""
    return build_application(ServeConfig.model_validate(dict(args)))
