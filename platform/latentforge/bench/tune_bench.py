"""`latentforge bench tune`: the same search space and seeds run (a) to completion without early
stopping and (b) with ASHA plus the instability stopper. Reports the training steps each
consumed, the best metric each reached, and the ratios (goal: b within 5% of a's best metric
using at most 40% of its steps)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from latentforge.tune.instability import InstabilityThresholds
from latentforge.tune.space import SchedulerConfig, SearchConfig, SweepConfig
from latentforge.tune.sweep import run_sweep
from latentforge.bench import mnist5k_unless

SPACE = {
    "gan.lr_g": {"choice": [5.0e-5, 2.0e-4, 5.0e-4, 1.0]},
    "gan.lr_d": {"choice": [5.0e-5, 2.0e-4, 5.0e-4, 1.0]},
    "gan.beta1": {"choice": [0.0, 0.5]},
}


def bench_tune(data_dir: str | None = None, trials: int = 8, steps: int = 600, seed: int = 0, log=print) -> dict:
    """Run both sweeps on mnist5k with a small DCGAN (16-channel nets, batch 32); 8 distinct
    configurations of the 32-point space, the same in both."""
    tmp = Path(tempfile.mkdtemp(prefix="lf-bench-tune-"))
    data_dir = mnist5k_unless(data_dir)
    common = dict(
        base="dcgan-mnist", space=SPACE, trials=trials, steps=steps, eval_every=50, eval_samples=1000, report_every=25,
        overrides={"model.g_width": 16, "model.d_width": 16, "model.z_dim": 32, "train.global_batch_size": 32},
        workers_per_trial=1, max_concurrent=4, metric="fid", mode="min", search=SearchConfig(seed=seed),
    )
    naive = SweepConfig(name="naive", scheduler=SchedulerConfig(kind="fifo"),
                        stopper=InstabilityThresholds(enabled=False), **common)
    # ASHA with the sweep defaults (rungs at 100 and 300 steps, keep the top third; two evaluations
    # before the first cut: FID at step 50 is mostly noise) and the rung re-check
    smart = SweepConfig(name="asha-stopper", scheduler=SchedulerConfig(kind="asha", grace_period=100, reduction_factor=3),
                        stopper=InstabilityThresholds(warmup_steps=200), **common)
    # 4 trials at a time (1 worker each, on 2 cores: the same total speed as 2 at a time), so that
    # rung decisions see several trials early; the local cluster declares the CPUs for that
    from latentforge.ray_cluster import ray_init

    ray_init(num_cpus=6)
    out = {"trials": trials, "max_steps_per_trial": steps, "concurrent_trials": 4}
    for key, sw in (("a", naive), ("b", smart)):
        t0 = time.time()
        summary = run_sweep(sw, data_dir, out=str(tmp / sw.name), log=lambda *_: None)
        best = summary["best"]["metric"] if summary.get("best") else float("nan")
        out[f"{key}_total_steps"] = summary["total_steps"]
        out[f"{key}_best_fid"] = best
        out[f"{key}_seconds"] = round(time.time() - t0, 1)
        out[f"{key}_status"] = {r["trial_id"]: r["status"] for r in summary["rows"]}
        log(f"  ({key}) {sw.name}: {summary['total_steps']} steps, best FID {best:.1f}, {out[f'{key}_seconds']:.0f}s")
    out["steps_ratio_b_over_a"] = out["b_total_steps"] / max(1, out["a_total_steps"])
    out["best_fid_ratio_b_over_a"] = out["b_best_fid"] / out["a_best_fid"]
    out["goal_met"] = out["steps_ratio_b_over_a"] <= 0.4 and out["best_fid_ratio_b_over_a"] <= 1.05
    log(f"  steps b/a = {out['steps_ratio_b_over_a']:.2f} (goal <= 0.40), best FID b/a = "
        f"{out['best_fid_ratio_b_over_a']:.3f} (goal <= 1.05)")
    return out
