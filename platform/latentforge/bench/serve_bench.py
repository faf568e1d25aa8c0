"""`latentforge bench serve`: generation throughput and latency through Ray Serve at concurrency
1, 8 and 32, with batching on and off, against the same model called in-process in batches.
Measured side by side in one run on one machine."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np


def _percentiles(latencies: list[float]) -> dict:
    a = np.asarray(latencies) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99))}


def load(url: str, model: str, concurrency: int, requests_per_client: int, n: int, path: str | None = None) -> dict:
    """`concurrency` clients, each sending `requests_per_client` generate requests of `n` images
    (or GETs of `path`). One asyncio client: 32 threads of `requests` took a large share of the
    2 cores the server runs on, and the bench measured the client as much as the server."""
    import asyncio

    import aiohttp

    latencies: list[float] = []
    errors = 0

    async def run():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                         timeout=aiohttp.ClientTimeout(total=300)) as session:
            async def client(c: int):
                nonlocal errors
                for i in range(requests_per_client):
                    t = time.perf_counter()
                    if path is not None:
                        call = session.get(f"{url}{path}")
                    else:
                        call = session.post(f"{url}/v1/models/{model}/generate",
                                            json={"n": n, "seed": c * 100_000 + i, "include_latents": False})
                    async with call as r:
                        await r.read()
                        ok = r.status == 200
                    if ok:
                        latencies.append(time.perf_counter() - t)
                    else:
                        errors += 1

            await asyncio.gather(*(client(c) for c in range(concurrency)))

    t0 = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - t0
    per_request = 1 if path is not None else n
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "requests_per_s": len(latencies) / wall, "images_per_s": len(latencies) * per_request / wall,
            **_percentiles(latencies)}


def mixed_load(url: str, model: str, concurrency: int = 32, seconds: float = 60.0, n: int = 4,
               mix: tuple[float, float, float] = (0.6, 0.25, 0.15), seed: int = 0) -> dict:
    """`concurrency` clients for `seconds`, each sending, one after another, a generate (n images),
    an attribute edit or an interpolation (8 frames), drawn with the shares in `mix`. Reports
    latency percentiles per kind and overall and every status seen (a 5xx is a failure of the
    bench's goal; shed load would be 503 with Retry-After)."""
    import asyncio
    import random

    import aiohttp

    kinds = ("generate", "edit", "interpolate")
    latencies: dict[str, list[float]] = {k: [] for k in kinds}
    statuses: dict[str, int] = {}
    rng = random.Random(seed)

    async def run():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                         timeout=aiohttp.ClientTimeout(total=300)) as session:
            async with session.get(f"{url}/v1/models/{model}/directions") as r:
                names = [d["name"] for d in (await r.json()).get("directions", [])]
            if not names:
                raise RuntimeError(f"model {model!r} has no edit directions to mix into the load")
            end = time.perf_counter() + seconds

            async def client(c: int):
                i = 0
                while time.perf_counter() < end:
                    kind = rng.choices(kinds, mix)[0]
                    s = c * 1_000_000 + i
                    i += 1
                    body = {"generate": {"n": n, "seed": s, "include_latents": False},
                            "edit": {"source": {"seed": s}, "direction": names[s % len(names)], "alpha": 2.0},
                            "interpolate": {"a": {"seed": s}, "b": {"seed": s + 1}, "steps": 8}}[kind]
                    t = time.perf_counter()
                    async with session.post(f"{url}/v1/models/{model}/{kind}", json=body) as r:
                        await r.read()
                        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
                        if r.status == 200:
                            latencies[kind].append(time.perf_counter() - t)

            await asyncio.gather(*(client(c) for c in range(concurrency)))

    t0 = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - t0
    every = [x for v in latencies.values() for x in v]
    return {"concurrency": concurrency, "seconds": round(wall, 1), "statuses": statuses,
            "server_errors": sum(v for k, v in statuses.items() if k.startswith("5")),
            "requests_per_s": len(every) / wall, **_percentiles(every),
            **{kind: {"requests": len(v), **_percentiles(v)} for kind, v in latencies.items() if v}}


def bench_serve_modes(modes: list[str], log=print, **kwargs) -> dict:
    """Run `bench_serve` once per Serve mode, each in a fresh process (the modes are read when
    Ray and Serve start), one after another on this machine, and compare them side by side."""
    import json
    import os
    import subprocess
    import sys

    from latentforge.serve.runner import REQUEST_PATHS as SERVE_MODES

    unknown = [m for m in modes if m not in SERVE_MODES]
    if unknown:
        from latentforge.errors import ConfigError

        raise ConfigError(f"unknown Serve mode(s) {unknown}; choose from: {', '.join(SERVE_MODES)}")
    results = {}
    for mode in modes:
        log(f"== Serve mode {mode}: {SERVE_MODES[mode] or 'Ray defaults'}")
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            code = ("import json, sys; from latentforge.bench.serve_bench import bench_serve; "
                    f"r = bench_serve(**json.loads(sys.argv[1])); open({out.name!r}, 'w').write(json.dumps(r))")
            env = {**os.environ, **SERVE_MODES[mode]}
            proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], env=env)
            if proc.returncode != 0:
                results[mode] = {"error": f"exit code {proc.returncode} (see the log above)"}
                continue
            results[mode] = json.loads(Path(out.name).read_text())
    base = results.get(modes[0], {})
    for mode, r in results.items():
        if "error" in r or "error" in base:
            continue
        top = max(kwargs.get("concurrencies", (1, 8, 32)))
        r["batched_vs_first_mode"] = r[f"batched_c{top}"]["images_per_s"] / base[f"batched_c{top}"]["images_per_s"]
        log(f"  {mode:10s}: Serve / in-process {r['serve_fraction_of_in_process']:.2f}, batching "
            f"{r['batching_speedup_at_max_concurrency']:.2f}x, batched {r[f'batched_c{top}']['images_per_s']:.0f} images/s "
            f"({r['batched_vs_first_mode']:.2f}x {modes[0]}), request path {r['request_path_requests_per_s']:.0f}/s")
    return {"modes": results}


def untrained_checkpoint(path: Path) -> Path:
    """An untrained dcgan-mnist (28x28, unconditional) checkpoint at `path`."""
    from latentforge.builders import build_gan
    from latentforge.checkpoint import save_checkpoint
    from latentforge.config import experiment_to_dict, load_experiment
    from latentforge.data.spec import DataSpec

    cfg = load_experiment("dcgan-mnist")
    g, d = build_gan(cfg.model, DataSpec((1, 28, 28), 0))
    return save_checkpoint(path, algorithm="gan", experiment=experiment_to_dict(cfg), data=DataSpec((1, 28, 28), 0),
                           modules={"generator": g, "discriminator": d, "generator_ema": copy.deepcopy(g)}, step=0)


def in_process(checkpoint_dir: str, n: int, batch_requests: int, repeats: int = 20, threads: int = 1) -> float:
    """Images/s of the same model called directly in batches of `batch_requests` requests."""
    import torch

    from latentforge.serve.engine import ModelRuntime
    from latentforge.serve.schemas import GenerateRequest

    torch.set_num_threads(threads)
    runtime = ModelRuntime("bench", checkpoint_dir)
    reqs = [GenerateRequest(n=n, seed=i, include_latents=False) for i in range(batch_requests)]
    runtime.generate_many(reqs)
    t = time.perf_counter()
    for _ in range(repeats):
        runtime.generate_many(reqs)
    return repeats * batch_requests * n / (time.perf_counter() - t)


def bench_serve(checkpoint: str | None = None, data_dir: str | None = None, n: int = 4,
                concurrencies=(1, 8, 32), requests_per_client: int = 12, mixed_seconds: float = 0.0,
                log=print) -> dict:
    """Deploy the batched and unbatched applications side by side and load each; with
    `mixed_seconds`, also a mixed generate / edit / interpolate load on the batched one."""
    import ray
    from ray import serve

    from latentforge.registry import local_checkpoint, promote
    from latentforge.serve.app import build_application
    from latentforge.serve.config import ServeConfig
    from latentforge.ray_cluster import ray_init

    tmp = Path(tempfile.mkdtemp(prefix="lf-bench-serve-"))
    if checkpoint is None:  # throughput does not depend on training
        checkpoint = str(untrained_checkpoint(tmp / "ckpt"))
    registry = str(tmp / "registry")
    promote(checkpoint, registry, "bench")
    threads = 1
    import os

    from latentforge.serve.runner import REQUEST_PATHS

    out: dict = {"serve_mode": {k: os.environ[k] for k in REQUEST_PATHS["haproxy"] if k in os.environ} or "default",
                 "model": "dcgan-mnist (28x28)", "images_per_request": n, "replicas": 1, "threads_per_replica": threads}
    out["in_process_batched_images_per_s"] = in_process(str(local_checkpoint(registry, "bench")), n, 32, threads=threads)
    out["in_process_single_images_per_s"] = in_process(str(local_checkpoint(registry, "bench")), n, 1, repeats=100,
                                                       threads=threads)
    log(f"  in-process: {out['in_process_batched_images_per_s']:.0f} images/s batched (32 requests of {n}), "
        f"{out['in_process_single_images_per_s']:.0f} one request at a time")
    ray_init(num_cpus=4)
    serve.start(http_options={"host": "127.0.0.1", "port": 8799})
    fixed = {"min_replicas": 1, "max_replicas": 1}
    for batching in (True, False):
        name = "batched" if batching else "unbatched"
        cfg = ServeConfig.model_validate({"registry": registry, "batching": batching, "replica_cpus": 1.0,
                                          "threads_per_replica": threads, "generator": fixed, "editor": fixed,
                                          "max_ongoing_requests": 64, "access_log": False})
        serve.run(build_application(cfg), name=name, route_prefix=f"/{name}")
        url = f"http://127.0.0.1:8799/{name}"
        load(url, "bench", 4, 3, n)  # warm-up: model load, connections
        if batching:  # the request path alone (proxy + gateway, no model): the ceiling on requests/s
            floor = load(url, "bench", max(concurrencies), requests_per_client * 2, n, path="/healthz")
            out["request_path_requests_per_s"] = floor["requests_per_s"]
            log(f"  request path alone (GET /healthz, concurrency {max(concurrencies)}): {floor['requests_per_s']:.0f} requests/s")
        for c in concurrencies:
            r = load(url, "bench", c, requests_per_client if c > 1 else requests_per_client * 3, n)
            out[f"{name}_c{c}"] = r
            log(f"  serve {name:9s} concurrency {c:2d}: {r['images_per_s']:7.1f} images/s "
                f"({r['requests_per_s']:5.1f} requests/s), p50 {r['p50_ms']:6.1f} ms, "
                f"p95 {r['p95_ms']:6.1f} ms, p99 {r['p99_ms']:6.1f} ms, errors {r['errors']}")
        if batching and mixed_seconds > 0:
            r = mixed_load(url, "bench", max(concurrencies), mixed_seconds, n)
            out["mixed"] = r
            log(f"  mixed load ({r['concurrency']} clients, {r['seconds']:.0f} s): {r['requests_per_s']:.1f} requests/s, "
                f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, statuses {r['statuses']}; " +
                ", ".join(f"{k} p50 {r[k]['p50_ms']:.0f} / p99 {r[k]['p99_ms']:.0f} ms" for k in ("generate", "edit", "interpolate") if k in r))
        serve.delete(name)
    serve.shutdown()
    ray.shutdown()
    top = max(concurrencies)
    out["batching_speedup_at_max_concurrency"] = out[f"batched_c{top}"]["images_per_s"] / out[f"unbatched_c{top}"]["images_per_s"]
    out["serve_fraction_of_in_process"] = out[f"batched_c{top}"]["images_per_s"] / out["in_process_batched_images_per_s"]
    log(f"  batching speed-up at concurrency {top}: {out['batching_speedup_at_max_concurrency']:.2f}x (goal >= 3); "
        f"Serve / in-process batched: {out['serve_fraction_of_in_process']:.2f} (goal >= 0.5)")
    return out
