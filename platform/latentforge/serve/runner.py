"""Start the Serve application (`latentforge serve`): a local Ray cluster unless `address` names
one, HTTP on 127.0.0.1 by default."""

from __future__ import annotations

import time

from latentforge.serve.config import ServeConfig

APP_NAME = "latentforge"


def start_serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                num_cpus: int | None = None) -> str:
    """Deploy the application and return its base URL."""
    from ray import serve

    from latentforge.serve.app import build_application
    from latentforge.ray_cluster import ray_init

    ray_init(address, num_cpus=num_cpus)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def serve_forever(cfg: ServeConfig, host: str, port: int, address: str | None = None, log=print) -> None:
    """Deploy, print where, and keep serving until interrupted."""
    from ray import serve

    url = start_serve(cfg, host, port, address)
    log(f"serving registry {cfg.registry} at {url}  (API docs: {url}/docs, models: {url}/v1/models)")
    log("press Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("stopping")
        serve.shutdown()
