"""`make demo`: prepare mnist5k, train a DCGAN and a VAE on 2 Ray workers, write pictures, and
put both models (with their edit directions) in a local registry the playground can serve.

Everything runs locally: a local Ray cluster, local storage, no account, no download.
Outputs land in ./demo-output/ (override with LATENTFORGE_DEMO_DIR).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from latentforge.algorithms.precision import native_bf16
from latentforge.config import PRECISION_MODES

# The fastest path that keeps quality: on a CPU with native bf16, bf16 autocast + channels_last
# trained dcgan-mnist 1.6x faster than fp32, to the same FID at equal steps (mean of 3 seeds,
# docs/performance.md), which pays for twice the GAN steps; elsewhere bf16 is emulated and slower,
# so fp32. torch.compile is left off: on 2 CPU cores it cost ~20 s to compile and ran no faster.
FAST = native_bf16("cpu")
FAST_PATH = PRECISION_MODES["bf16+channels_last"] if FAST else PRECISION_MODES["fp32"]
DEMO_STEPS = {"dcgan-mnist": 2500 if FAST else 1200, "vae-mnist": 400}
# A short run wants a faster recipe than the preset's (the DCGAN paper's lr 2e-4, tuned for long
# runs): with lr 1e-3 for G and D, dcgan-mnist reached FID 28 at 2,000 steps where lr 2e-4 scored
# 50 and lr 5e-4 31 (one process, bf16 + channels_last, 2,000 EMA samples). In the demo (2 workers,
# 2,500 steps) it scores FID 24.6 on 5,000 samples; the preset's lr scored 106 at 800 steps.
DEMO_OVERRIDES = {"dcgan-mnist": {"gan.lr_g": 1e-3, "gan.lr_d": 1e-3}, "vae-mnist": {}}
# Two Ray Train workers with one torch thread each: on 2 cores they ran the DCGAN at ~850 images/s
# in bf16, one worker with 2 threads at ~620 (its two threads wait on each other whenever Ray's
# own processes take a core; the plain loop without Ray reaches ~1,100).
WORKERS = 2
FID_SAMPLES = 5000


def main() -> int:
    os.environ.setdefault("WANDB_MODE", "offline")
    from latentforge.checkpoint import load_checkpoint
    from latentforge.config import load_experiment
    from latentforge.data.dataset import PreparedDataset
    from latentforge.images import to_model_range
    from latentforge.data.prepare import prepare_dataset
    from latentforge.editing.directions import compute_directions, save_directions
    from latentforge.metrics.features import ensure_feature_net
    from latentforge.registry import promote
    from latentforge.images import grid_png
    from latentforge.metrics.evaluate import distribution_metrics
    from latentforge.metrics.two_sample import c2st_accuracy
    from latentforge.sampling import generate
    from latentforge.storage import atomic_write_bytes
    from latentforge.train.ray_train import train_ray

    t0 = time.time()
    out = Path(os.environ.get("LATENTFORGE_DEMO_DIR", "demo-output")).resolve()
    data = out / "data" / "mnist5k"
    registry = out / "registry"
    print(f"== 1/3 data: {data}")
    if not (data / "manifest.json").exists():
        prepare_dataset("mnist5k", data)
    else:
        print("   already prepared")
    ds = PreparedDataset(data)
    real = to_model_range(ds.load("val").images)
    net = ensure_feature_net(data, log=lambda m: print(f"   {m}"))  # the classifier behind class edits

    pictures = []
    run_name = time.strftime("%Y%m%d-%H%M%S")
    for i, (preset, steps) in enumerate(DEMO_STEPS.items(), start=2):
        path = "bf16 autocast + channels_last" if FAST else "fp32 (this CPU has no native bf16)"
        print(f"== {i}/3 train {preset} for {steps} steps on {WORKERS} Ray Train workers, {path}")
        cfg = load_experiment(preset, {"train.steps": steps, "train.checkpoint_every": steps,
                                       "train.sample_every": steps // 4, "train.log_every": 100, **FAST_PATH,
                                       **DEMO_OVERRIDES[preset]})
        result = train_ray(cfg, data, workers=WORKERS, out=f"{preset}-{run_name}", storage=str(out / "runs"))
        ckpt = load_checkpoint(result["run_dir"])
        images, _, _ = generate(ckpt, 64, seed=0)
        grid = out / f"{preset}-samples.png"
        atomic_write_bytes(grid, grid_png(images))
        fakes, _, _ = generate(ckpt, FID_SAMPLES, seed=1, max_n=None)
        fid = distribution_metrics(fakes, net, "train")["fid"]
        fid_small = distribution_metrics(fakes[: len(real)], net, "train")["fid"]  # like for like with the floor
        acc = c2st_accuracy(real, fakes[: len(real)], steps=150)
        pictures.append((preset, grid, Path(result["run_dir"]) / "samples", acc, fid, fid_small))
        save_directions(ckpt.path, compute_directions(ckpt, ds, net))
        promote(ckpt.path, str(registry), preset, overwrite=True)

    print(f"\n== done in {time.time() - t0:.0f}s. Pictures to look at:")
    floor = distribution_metrics(real, net, "train")["fid"]
    for preset, grid, samples, acc, fid, fid_small in pictures:
        print(f"   {grid}   ({preset}; training progress in {samples}/)")
        print(f"      FID {fid:.1f}: the distance between {FID_SAMPLES:,} of its samples and the training digits in the "
              f"features of the dataset's own classifier (lower is better; an untrained generator scores several "
              f"hundred). FID depends on the sample count: on {len(real)} of its samples it scores {fid_small:.1f}, "
              f"where the {len(real)} real held-out digits score {floor:.1f}")
        print(f"      a fresh classifier tells its samples from real digits with {acc:.0%} accuracy "
              f"(100% = obviously fake, 50% = indistinguishable)")
    print("   generate more: latentforge generate <run folder> --n 64 --seed 1 --out more.png")
    print("\n   Try both models in the editing playground (generate, edit with sliders, interpolate, inpaint):")
    print(f"      latentforge serve --registry {registry} --port 8000")
    print("      then open http://127.0.0.1:8000/ (API docs at /docs); Ctrl-C stops it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
