"""`latentforge bench train`: one preset and global batch, measured in one run as
- the plain single-process step loop in each precision/layout mode (fp32, bf16, bf16 +
  channels_last): images/s, achieved GFLOP/s, and the fraction of the measured matmul peak of the
  precision used (both peaks measured in the same run), with each mode's speed-up over fp32;
- (a) the plain loop in the preset's own precision, (b) Ray Train with 1 worker, (c) Ray Train
  with 2 workers.

Each Ray worker gets cores / workers torch threads, so (a) and (b) use the same compute and b/a
is Ray's overhead; c/a is what data parallelism buys on this machine. Throughput is measured
after a warm-up window; FLOPs are counted on a real step and compared with a measured matmul peak.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from latentforge.algorithms.noise import GlobalNoise
from latentforge.algorithms.precision import native_bf16, precision_for
from latentforge.bench.hardware import count_flops, matmul_peak_gflops
from latentforge.data.spec import DataSpec
from latentforge.config import PRECISION_MODES, load_experiment
from latentforge.data.dataset import PreparedDataset
from latentforge.errors import ConfigError
from latentforge.train.batches import InMemoryBatches
from latentforge.devices import settle
from latentforge.host_memory import keep_freed_host_memory
from latentforge.train.program import build_program
from latentforge.bench import mnist5k_unless


class _PlainLoop:
    """The step function in a bare loop over in-memory batches, built and warmed up once, then
    timed in as many stretches as asked (`timed`); also counts FLOPs per image."""

    def __init__(self, cfg, data_dir, warmup: int, device: str = "cpu"):
        keep_freed_host_memory()  # as `run_training` does: the loop measured is the loop trained
        ds = PreparedDataset(data_dir)
        spec = DataSpec.from_dataset(ds)
        self.program = build_program(cfg, spec, GlobalNoise(cfg.train.seed, device=device), device)
        self.it = InMemoryBatches(ds.load("train"), cfg.train.global_batch_size, cfg.train.seed, device=device).iterate()
        self.per_step, self.device = self.program.batches_per_step, device
        self.images_per_step = cfg.train.global_batch_size * self.per_step
        t0 = time.perf_counter()
        self._step(0)
        self.first_step_s = time.perf_counter() - t0  # includes compilation under train.compile
        for s in range(1, warmup):
            self._step(s)
        self.step = warmup
        # FLOPs are counted on eager steps (compiled kernels bypass the counter; the math is the same),
        # over one period of the lazy regularisers: one step alone would count R1 (every 16th D update
        # in StyleGAN2) as on every step, or never, depending on --warmup
        period = 1 if cfg.train.compile else min(regulariser_period(cfg), MAX_COUNTED_STEPS)
        flops = float("nan") if cfg.train.compile else sum(self._counted_step() for _ in range(period))
        self.flops_per_image = flops / (period * self.images_per_step)

    def _counted_step(self) -> float:
        batches = self._batches()
        flops = count_flops(lambda: self.program.step(batches, self.step))
        self.step += 1
        return flops

    def _batches(self):
        return [next(self.it) for _ in range(self.per_step)]

    def _step(self, s: int):
        self.program.step(self._batches(), s)

    def timed(self, steps: int) -> float:
        """Seconds for the next `steps` steps."""
        settle(self.device)
        t = time.perf_counter()
        for _ in range(steps):
            self._step(self.step)
            self.step += 1
        settle(self.device)
        return time.perf_counter() - t


MAX_COUNTED_STEPS = 64  # the presets' period is 16; an odd pair of intervals (64, 63) would be 4032 eager steps


def regulariser_period(cfg) -> int:
    """Training steps after which a GAN's lazy regularisers (R1 every `r1_interval` D updates, path
    length every `pl_interval` G steps) have all run in their proportion: the FLOP count's window."""
    if cfg.algorithm != "gan":
        return 1
    g = cfg.gan
    r1 = g.r1_interval // math.gcd(g.r1_interval, g.n_critic) if g.r1_weight > 0 else 1  # D updates: n_critic a step
    pl = g.pl_interval if getattr(g, "pl_weight", 0) > 0 else 1
    return math.lcm(r1, pl)


def ray_run(cfg, data_dir, workers: int, warmup: int, steps: int, storage: str, data_loader: str, use_gpu: bool) -> dict:
    """(b)/(c): a real `train_ray` run; throughput from the log windows after the warm-up."""
    from latentforge.train.ray_train import train_ray

    records = []
    # the plain loop's whole config (a --set on the model or a YAML preset included), with the run's
    # length and quiet logging: re-validated, so the Ray runs measure the very model of (a)
    run_cfg = type(cfg).model_validate({**cfg.model_dump(), "train": {
        **cfg.train.model_dump(), "steps": warmup + steps, "log_every": warmup if warmup else steps,
        "checkpoint_every": 10**9, "sample_every": 10**9, "tracking": "none",
        "threads": max(1, (os.cpu_count() or 2) // workers),
    }})
    result = train_ray(run_cfg, data_dir, workers=workers, out=f"bench-{workers}w-{time.time_ns()}", storage=storage,
                       data_loader=data_loader, use_gpu=use_gpu, log=lambda *_: None)
    from latentforge.storage import join_uri, read_bytes_uri
    import json

    for line in (read_bytes_uri(join_uri(result["run_dir"], "metrics.jsonl")) or b"").decode().splitlines():
        records.append(json.loads(line))
    after = [r for r in records if r["step"] > warmup]
    step_time = sum(r["step_time_s"] * (r["step"] - p["step"]) for p, r in zip(records, records[1:]) if r["step"] > warmup)
    n = sum(r["step"] - p["step"] for p, r in zip(records, records[1:]) if r["step"] > warmup)
    per_step_images = cfg.train.global_batch_size * (cfg.gan.n_critic if cfg.algorithm == "gan" else 1)
    return {"images_per_s": per_step_images * n / step_time if step_time else float("nan"), "windows": len(after)}


MODES = PRECISION_MODES  # precision/layout modes: name -> config overrides


def with_mode(mode: str, overrides: dict | None) -> dict:
    """`overrides` and a bench mode's settings, merged; the mode is named in every result, so an
    override that contradicts it (`--modes fp32 --set train.channels_last=true`) is refused rather
    than measured under the wrong name.

    Raises:
        ConfigError: an override of a setting that the mode fixes to another value.
    """
    overrides = overrides or {}
    fixed = MODES[mode]
    clash = sorted(k for k in overrides if k in fixed and overrides[k] != fixed[k])
    if clash:
        said = ", ".join(f"{k}={overrides[k]}" for k in clash)
        means = ", ".join(f"{k}={v}" for k, v in fixed.items())
        raise ConfigError(f"{said} contradicts the bench mode {mode!r} ({means}); choose precision and layout "
                          f"with the modes instead, e.g. --modes fp32,fp32+channels_last (modes: {', '.join(MODES)})")
    return {**overrides, **fixed}


def bench_modes(preset: str, data_dir: str, warmup: int, steps: int, device: str, modes=tuple(MODES), log=print,
                overrides: dict | None = None, rounds: int = 5) -> dict:
    """The plain loop in each mode, interleaved: every mode is built and warmed up, then the timed
    steps run in `rounds` stretches, each round measuring both matmul peaks and timing every mode
    in turn. This machine's speed drifts by up to 50% between minutes (a shared host): run one
    after another, the same modes gave dcgan-mnist's bf16 + channels_last anything from 1.3x to
    2.3x fp32. A mode's speed-up is the median over rounds of its speed against fp32's in the same
    round, and its share of the peak the median of its GFLOP/s against the same round's peak,
    each with its range. `overrides` (e.g. a GPU-sized batch) apply to every mode."""
    if rounds < 1 or steps < rounds:
        raise ConfigError(f"--rounds {rounds} with --steps {steps}: give 1..{max(steps, 1)} rounds (each needs a step)")
    order = ["fp32", *[m for m in modes if m != "fp32"]]
    settings = {mode: with_mode(mode, overrides) for mode in order}  # a contradiction fails before any run
    device_type = torch.device(device).type
    bf16_emulated = not native_bf16(device_type)
    if bf16_emulated and any("bf16" in m for m in modes):
        why = "no AVX512-BF16 or AMX" if device_type == "cpu" else "no bf16 units"
        log(f"  note: bf16 is emulated on this device ({why}): the bf16 modes run several times slower than "
            "fp32, and their 'peak' is the emulation's, not the hardware's; use fp32 (with channels_last) here")
    loops = {}
    for mode in order:
        loops[mode] = _PlainLoop(load_experiment(preset, {"train.tracking": "none", **settings[mode]}), data_dir, warmup,
                                 device)
        log(f"  {mode:<28s} built and warmed up (first step {loops[mode].first_step_s:.1f} s)")
    per_round = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    speeds: dict[str, list[float]] = {mode: [] for mode in order}  # images/s per round
    round_peaks: list[dict[str, float]] = []  # the peaks drift with the machine too
    for r, n in enumerate(per_round):
        round_peaks.append({"fp32": matmul_peak_gflops(device=device),
                            "bf16": matmul_peak_gflops(device=device, dtype=torch.bfloat16)})
        for mode in order:
            speeds[mode].append(loops[mode].images_per_step * n / loops[mode].timed(n))
        log(f"  round {r + 1}/{rounds} (matmul peak fp32 {round_peaks[-1]['fp32']:.0f}, bf16 {round_peaks[-1]['bf16']:.0f} "
            "GFLOP/s): " + ", ".join(f"{m} {speeds[m][-1]:.0f}" for m in order) + " images/s")
    peaks = {p: statistics.median(rp[p] for rp in round_peaks) for p in ("fp32", "bf16")}
    log(f"  matmul peak (median of the rounds): fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s")
    out = {}
    flops = loops["fp32"].flops_per_image
    for mode in order:
        precision = MODES[mode]["train.precision"]
        ratios = sorted(a / b for a, b in zip(speeds[mode], speeds["fp32"]))
        shares = sorted(flops * v / 1e9 / rp[precision] for v, rp in zip(speeds[mode], round_peaks))
        ips = sum(per_round) / sum(n / v for n, v in zip(per_round, speeds[mode]))  # over all timed steps
        gflops = flops * ips / 1e9
        share = statistics.median(shares)
        out[mode] = {"images_per_s": ips, "gflops": gflops, "peak_gflops": peaks[precision], "fraction_of_peak": share,
                     "fraction_of_peak_range": [shares[0], shares[-1]],
                     "speedup_over_fp32": statistics.median(ratios), "speedup_range": [ratios[0], ratios[-1]],
                     "first_step_s": loops[mode].first_step_s}
        log(f"  {mode:<28s} {ips:8.1f} images/s  {gflops:6.1f} GFLOP/s = {share:5.1%} of the {precision} peak "
            f"({shares[0]:.0%}..{shares[-1]:.0%})   x{out[mode]['speedup_over_fp32']:.2f} vs fp32 "
            f"({ratios[0]:.2f}..{ratios[-1]:.2f})   (first step {loops[mode].first_step_s:.1f} s)")
    return {"matmul_peak_gflops": peaks, "bf16_emulated": bf16_emulated, "rounds": rounds, "modes": out}


# Seconds of training a Ray run warms up for before its timed steps. A run's first seconds share the
# CPU with the cluster's start-up work (the driver and TrainController set up, Ray Data's executor
# starts): on 2 cores, other processes took 0.73 cores in the 10 s before the first step, 0.26 in
# the first 3 s of training, and 0.11-0.16 from then on; a 1-worker dcgan-mnist run logged
# 1,140 images/s over steps 1-80 against 1,250 from step 100 on (docs/performance.md). Users' runs
# last minutes to days: the steady state is their overhead.
RAY_SETTLE_S = 10.0


def ray_warmup_steps(warmup: int, plain_images_per_s: float, images_per_step: int, settle_s: float = RAY_SETTLE_S) -> int:
    """The Ray runs' warm-up: `warmup` steps, or as many as the plain loop runs in `settle_s`
    seconds if that is more (a NaN speed, a loop that could not be timed, keeps `warmup`)."""
    if not plain_images_per_s > 0 or settle_s <= 0:
        return warmup
    return max(warmup, math.ceil(settle_s * plain_images_per_s / images_per_step))


def bench_train(preset: str = "dcgan-mnist", data_dir: str | None = None, warmup: int = 20, steps: int = 100,
                data_loader: str = "stream", use_gpu: bool = False, modes=tuple(MODES), ray: bool = True,
                log=print, overrides: dict | None = None, rounds: int = 5, ray_rounds: int = 3,
                ray_settle_s: float = RAY_SETTLE_S) -> dict:
    """The precision/layout modes, then (a), (b), (c); returns images/s, ratios, FLOPs per image
    and GFLOP/s. `ray=False` measures the modes only.

    This machine's speed drifts (a shared host), and a Ray Train run is a separate job that cannot
    be interleaved step by step, so the runs are bracketed: a, then `ray_rounds` times (b, a), then
    c, a. Each b is compared with the mean of the plain-loop measurements just before and after it,
    and b/a is the median of those ratios, with their range; c/a likewise from its own bracket.
    The Ray runs warm up for as many steps as the plain loop runs in `ray_settle_s` seconds
    (`RAY_SETTLE_S`), so that b and c measure training, not the cluster's start-up; the plain
    loop first steps, untimed, for as long after the cluster starts."""
    from latentforge.ray_cluster import ray_init

    if ray and ray_rounds < 1:
        raise ConfigError(f"--ray-rounds {ray_rounds}: give 1 or more (each round is one Ray Train run with 1 worker)")
    if ray and not (math.isfinite(ray_settle_s) and ray_settle_s >= 0):
        raise ConfigError(f"--ray-settle {ray_settle_s}: give 0 or more seconds (0: the Ray runs warm up for --warmup steps)")
    if use_gpu:
        from latentforge.devices import require_cuda

        require_cuda("--gpus", "drop --gpus to measure this CPU")
    cfg = load_experiment(preset, {"train.tracking": "none", **(overrides or {})})
    tmp = Path(tempfile.mkdtemp(prefix="lf-bench-"))
    data_dir = mnist5k_unless(data_dir)
    device = "cuda" if use_gpu else "cpu"
    cores = os.cpu_count() or 2
    torch.set_num_threads(cores)
    host_memory = keep_freed_host_memory()
    log(f"bench train: {preset}, global batch {cfg.train.global_batch_size}, {warmup} warm-up + {steps} timed steps, {cores} cores, "
        f"freed host memory {host_memory}")
    head = {"preset": preset, "global_batch_size": cfg.train.global_batch_size, "device": device, "cores": cores,
            "warmup_steps": warmup, "timed_steps": steps, "host_memory": host_memory}
    precision_table = bench_modes(preset, data_dir, warmup, steps, device, modes, log, overrides, rounds) if modes else {}
    if not ray:
        return {**head, **precision_table}
    # the peak of the precision the preset trains in here ('auto' is bf16 on a CPU with native bf16)
    used = precision_for(cfg.train, device).name
    peak_dtype = torch.bfloat16 if used == "bf16" else torch.float32
    loop = _PlainLoop(cfg, data_dir, warmup, device)  # built and warmed up once, timed between the Ray runs
    plain: list[float] = []
    peaks: list[float] = []  # measured with each plain run: the peak drifts with the machine too

    def time_plain() -> None:
        torch.set_num_threads(cores)
        peaks.append(matmul_peak_gflops(device=device, dtype=peak_dtype))
        plain.append(loop.images_per_step * steps / loop.timed(steps))
        log(f"  (a) plain PyTorch loop:   {plain[-1]:8.1f} images/s   (matmul peak {used} {peaks[-1]:.0f} GFLOP/s)")

    ray_init()  # first: every plain run then shares the machine with Ray's own processes, as b and c do
    settled = 0.0  # the plain loop steps, untimed, while the cluster starts
    while settled < ray_settle_s:
        spent = loop.timed(max(1, steps // 10))
        if not spent > 0:
            break
        settled += spent
    time_plain()
    ray_warmup = ray_warmup_steps(warmup, plain[0], loop.images_per_step, ray_settle_s)
    # 2 workers on 2 GPUs step up to twice as fast as 1; on a CPU they share the cores and do not
    c_warmup = ray_warmup * (2 if use_gpu else 1)
    why = (f"the plain loop's steps in {ray_settle_s:g} s (a run's first seconds share the machine with the "
           "cluster's start-up)") if ray_settle_s else "--warmup, with --ray-settle 0"
    log(f"  Ray runs warm up for {ray_warmup} steps ({c_warmup} with 2 workers), {why}, then time {steps}")
    b_runs, b_ratios = [], []
    for _ in range(ray_rounds):
        b_runs.append(ray_run(cfg, data_dir, 1, ray_warmup, steps, str(tmp / "runs"), data_loader, use_gpu)["images_per_s"])
        log(f"  (b) Ray Train, 1 worker:  {b_runs[-1]:8.1f} images/s")
        time_plain()
        b_ratios.append(b_runs[-1] / statistics.mean(plain[-2:]))
    c = c_ratio = float("nan")
    if not use_gpu or torch.cuda.device_count() >= 2:
        c = ray_run(cfg, data_dir, 2, c_warmup, steps, str(tmp / "runs"), data_loader, use_gpu)["images_per_s"]
        log(f"  (c) Ray Train, 2 workers: {c:8.1f} images/s")
        time_plain()
        c_ratio = c / statistics.mean(plain[-2:])
    a, peak = statistics.median(plain), statistics.median(peaks)
    # a Ray run whose log gave no window after the warm-up has no speed (NaN): left out, and counted
    b_measured = [v for v in b_runs if not math.isnan(v)]
    b_ratios = sorted(r for r in b_ratios if not math.isnan(r))
    b = statistics.median(b_measured) if b_measured else float("nan")
    if len(b_measured) < ray_rounds:
        log(f"  note: {ray_rounds - len(b_measured)} of {ray_rounds} Ray runs logged no window after the warm-up "
            "(raise --steps)")
    flops = loop.flops_per_image
    out = {
        **head, "data_loader": data_loader, "ray_rounds": ray_rounds, "ray_warmup_steps": ray_warmup,
        "ray_settle_s": ray_settle_s,
        "a_plain_images_per_s": a, "a_plain_runs_images_per_s": plain,
        "b_ray1_images_per_s": b, "b_ray1_runs_images_per_s": b_runs,
        "c_ray2_images_per_s": c,
        "ratio_b_over_a": statistics.median(b_ratios) if b_ratios else float("nan"),
        "ratio_b_over_a_range": [b_ratios[0], b_ratios[-1]] if b_ratios else [],
        "ratio_c_over_a": c_ratio,
        "train_flops_per_image": flops, "precision": used, "a_matmul_peak_gflops": peak,  # the modes have theirs
        "a_gflops": flops * a / 1e9, "b_gflops": flops * b / 1e9, "c_gflops": flops * c / 1e9,
    }
    out["a_fraction_of_peak"] = statistics.median(flops * v / 1e9 / p for v, p in zip(plain, peaks))
    out.update(precision_table)
    spread = f"{b_ratios[0]:.2f}..{b_ratios[-1]:.2f}" if b_ratios else "none measured"
    log(f"  b/a = {out['ratio_b_over_a']:.3f} (median of {len(b_ratios)}, each against the plain runs before and after it: "
        f"{spread})   c/a = {c_ratio:.3f}   "
        f"(plain loop {min(plain):.0f}..{max(plain):.0f} images/s over {len(plain)} runs)")
    log(f"  training FLOPs per image: {flops / 1e6:.1f} MFLOP; achieved (a) {out['a_gflops']:.1f} GFLOP/s "
        f"= {out['a_fraction_of_peak']:.0%} of the {used} matmul peak (median {peak:.0f} GFLOP/s, each run against its own)")
    return out
