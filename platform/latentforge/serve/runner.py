"""Start the Serve application (`latentforge serve`): a local Ray cluster unless `address` names
one, HTTP on 127.0.0.1 by default."""

from __future__ import annotations

import time

from latentforge.serve.config import ServeConfig

APP_NAME = "latentforge"


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_exposure(cfg: ServeConfig, host: str, allow_unauthenticated: bool = False) -> None:
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
    if key is None and host not in LOOPBACK and not allow_unauthenticated:
        raise ConfigError(f"serving on {host} without an API key would let anyone on the network use the models: "
                          "set LATENTFORGE_API_KEY, --api-key-file or api_key_file/api_key_env in the serve config "
                          "(or, behind your own authenticating proxy, allow it explicitly)")


def start_serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                num_cpus: int | None = None, allow_unauthenticated: bool = False) -> str:
    """Deploy the application and return its base URL."""
    from ray import serve

    from latentforge.serve.app import build_application
    from latentforge.ray_cluster import ray_init

    check_exposure(cfg, host, allow_unauthenticated)
    ray_init(address, num_cpus=num_cpus)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def serve_forever(cfg: ServeConfig, host: str, port: int, address: str | None = None, log=print,
                  allow_unauthenticated: bool = False) -> None:
    """Deploy, print where, and keep serving until interrupted."""
    from ray import serve

    url = start_serve(cfg, host, port, address, allow_unauthenticated=allow_unauthenticated)
    auth = "API key required" if cfg.resolve_api_key() else "no API key"
    log(f"serving registry {cfg.registry} at {url} ({auth}; API docs: {url}/docs, models: {url}/v1/models)")
    log("press Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("stopping")
        serve.shutdown()
