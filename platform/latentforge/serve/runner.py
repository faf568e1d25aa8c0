"""Start the Serve application (`latentforge serve`): a local Ray cluster unless `address` names
one, HTTP on 127.0.0.1 by default."""

from __future__ import annotations

import math
import time

from latentforge.serve.config import GPU_FIELDS, ServeConfig

APP_NAME = "latentforge"


LOOPBACK = ("127.0.0.1", "localhost", "::1")

# Ray Serve's request paths (read from the environment when Ray starts). `haproxy` puts HAProxy in
# front of the ingress replicas' own HTTP ports (direct ingress): measured on 2 cores, 2.4x the
# batched generation throughput of the default Python proxy (docs/performance.md). Its replica
# ports listen on every interface, so it needs an API key (or an explicit opt-out).
REQUEST_PATHS = {
    "default": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


def check_exposure(cfg: ServeConfig, host: str, allow_unauthenticated: bool = False,
                   request_path: str = "default") -> None:
    """Refuse to serve beyond this machine without an API key (unless explicitly allowed), and
    fail before Ray starts when a configured key source is missing.

    Raises:
        ConfigError: as above.
    """
    from latentforge.errors import ConfigError

    try:
        key = cfg.resolve_api_key()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if key is None and request_path == "haproxy" and not allow_unauthenticated:
        raise ConfigError("the haproxy request path opens the ingress replicas' ports on every interface: "
                          "set an API key (LATENTFORGE_API_KEY, --api-key-file, or api_key_file/api_key_env in the "
                          "serve config), or allow unauthenticated serving explicitly")
    if key is None and host not in LOOPBACK and not allow_unauthenticated:
        raise ConfigError(f"serving on {host} without an API key would let anyone on the network use the models: "
                          "set LATENTFORGE_API_KEY, --api-key-file or api_key_file/api_key_env in the serve config "
                          "(or, behind your own authenticating proxy, allow it explicitly)")


def gpus_for(shares: list[float]) -> int:
    """Whole GPUs that replicas asking `shares`, placed in this order, occupy. A share of one or more
    takes whole GPUs; Ray places each fraction on a GPU with room left, as the replica arrives
    (first fit; 1e-9 keeps ten replicas of 0.1 from needing a second GPU through rounding)."""
    whole = sum(math.ceil(s - 1e-9) for s in shares if s >= 1)
    free: list[float] = []  # room left on each GPU holding fractions
    for share in (s for s in shares if 0 < s < 1):
        gpu = next((i for i, room in enumerate(free) if room >= share - 1e-9), None)
        if gpu is None:
            free.append(1.0)
            gpu = len(free) - 1
        free[gpu] -= share
    return whole + len(free)


def check_replica_gpus(cfg: ServeConfig, cluster_gpus: float, joined: bool, log=print) -> None:
    """`replica_gpus` and `editor_gpus` ask that many GPUs for each Generator and Editor replica,
    and Serve starts `min_replicas` of each (at least one) before the application runs: a local
    cluster with fewer GPUs is refused (the deployment would wait forever), a joined one may add
    GPU nodes (said, not refused).

    Raises:
        ConfigError: a local cluster with fewer GPUs than the first replicas ask.
    """
    from latentforge.errors import ConfigError

    asks = [(field, getattr(cfg, field), name, max(1, getattr(cfg, name.lower()).min_replicas))
            for name, field in GPU_FIELDS.items() if getattr(cfg, field)]
    # Serve starts both deployments at once: whichever's replicas Ray places first, they must fit
    needed = max(gpus_for([share for _, share, _, replicas in order for _ in range(replicas)])
                 for order in (asks, asks[::-1]))
    if not asks or cluster_gpus >= needed:
        return
    have = (" and ".join(f"{field}: {share:g} per {name} replica, for {replicas} replica(s)" for field, share, name, replicas in asks)
            + f" ({' and '.join(f'{name.lower()}.min_replicas' for _, _, name, _ in asks)}, at least one), "
            f"ask{'s' if len(asks) == 1 else ''} {needed:g} GPU(s) and this Ray cluster has {cluster_gpus:g}")
    if not joined:
        if len(asks) == 1:
            field, share, name, replicas = asks[0]
            fit = max((k for k in range(1, replicas) if gpus_for([share] * k) <= cluster_gpus), default=0)
            fewer = f"lower {name.lower()}.min_replicas to {fit} or {field}, " if fit else ""
            raise ConfigError(f"{have}: {fewer}set {field}: 0 to serve on CPUs, or serve on a GPU machine")
        raise ConfigError(f"{have}: lower the min_replicas or the GPUs per replica, set replica_gpus or editor_gpus "
                          "to 0 to run that deployment on CPUs, or serve on a GPU machine")
    log(f"warning: {have}; the replicas wait until the cluster (its autoscaler) adds GPU nodes")


def start_serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                num_cpus: int | None = None, allow_unauthenticated: bool = False, request_path: str = "default") -> str:
    """Deploy the application and return its base URL.

    `request_path` (REQUEST_PATHS) applies to the local cluster this starts; a cluster given by
    `address` keeps the one its nodes were started with (set the variables there)."""
    import os

    import ray
    from ray import serve

    from latentforge.errors import ConfigError
    from latentforge.serve.app import build_application
    from latentforge.ray_cluster import joined_cluster, ray_init

    if request_path not in REQUEST_PATHS:
        raise ConfigError(f"unknown request path {request_path!r}; choose one of: {', '.join(REQUEST_PATHS)}")
    check_exposure(cfg, host, allow_unauthenticated, request_path)
    if request_path != "default":
        if address is not None or ray.is_initialized():
            raise ConfigError(f"--request-path {request_path} applies to a cluster this command starts; on an "
                              f"existing cluster start every node with {' '.join(f'{k}={v}' for k, v in REQUEST_PATHS[request_path].items())}")
        os.environ.update(REQUEST_PATHS[request_path])  # the local raylet and Serve's actors inherit it
    ray_init(address, num_cpus=num_cpus)
    if any(getattr(cfg, field) for field in GPU_FIELDS.values()):  # before anything is deployed: a replica no node can place would pend forever
        check_replica_gpus(cfg, float(ray.cluster_resources().get("GPU", 0)), joined=joined_cluster(address))
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    wait_until_routed(url)
    return url


def _routes(url: str) -> dict:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/-/routes", timeout=10) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):  # not listening yet, or not JSON yet
        return {}


def wait_until_routed(url: str, timeout: float = 60.0) -> None:
    """Return once the HTTP entry point lists the application's route.

    `serve.run` returns when the replicas run; a proxy in front of them (HAProxy on the `haproxy`
    request path) learns the route a moment later, and until then answers 404.

    Raises:
        RuntimeError: the route did not appear within `timeout` seconds.
    """
    for wildcard in ("0.0.0.0", "::"):
        url = url.replace(f"//{wildcard}:", "//127.0.0.1:")
    deadline = time.monotonic() + timeout
    while not _routes(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Serve deployed the application but {url}/-/routes listed no route within "
                               f"{timeout:.0f} s; see `ray status` and the Serve logs under the Ray session folder")
        time.sleep(0.25)


def serve_forever(cfg: ServeConfig, host: str, port: int, address: str | None = None, log=print,
                  allow_unauthenticated: bool = False, request_path: str = "default") -> None:
    """Deploy, print where, and keep serving until interrupted."""
    from ray import serve

    url = start_serve(cfg, host, port, address, allow_unauthenticated=allow_unauthenticated, request_path=request_path)
    auth = "API key required" if cfg.resolve_api_key() else "no API key"
    log(f"serving registry {cfg.registry} at {url} ({auth}; API docs: {url}/docs, models: {url}/v1/models)")
    log("press Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("stopping")
        serve.shutdown()
