"""`make demo`: prepare mnist5k, train a class-conditional DCGAN and a VAE on 2 Ray workers, write pictures, and
put both models (with their edit directions) in a local registry the playground can serve. Where
Debian's colour emoji are installed, also train a VAE on them and picture its reconstructions and
inpainting (a third model in the registry).

Everything runs locally: a local Ray cluster, local storage, no account, no download.
Outputs land in ./demo-output/ (override with LATENTFORGE_DEMO_DIR).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from latentforge.algorithms.precision import native_bf16
from latentforge.config import PRECISION_MODES

# The fastest path that keeps quality: on a CPU with native bf16, bf16 autocast + channels_last
# trained dcgan-mnist 1.6x faster than fp32, to the same FID at equal steps (mean of 3 seeds,
# docs/performance.md), which pays for twice the GAN steps; elsewhere bf16 is emulated and slower,
# so fp32, with channels_last, which on an AVX2 CPU trained dcgan-mnist 1.15x and the ResNet and
# StyleGAN2-style presets 1.1-1.3x faster than NCHW in fp32 (docs/performance.md). torch.compile is
# left off: on 2 CPU cores it cost ~20 s to compile and ran no faster.
FAST = native_bf16("cpu")
FAST_PATH = PRECISION_MODES["bf16+channels_last"] if FAST else PRECISION_MODES["fp32+channels_last"]
# The GAN is the class-conditional DCGAN: at the same cost per step it learns digits far sooner
# than the unconditional one (1,200 steps, lr 1e-3, one process, fp32 + channels_last on an AVX2
# CPU, seed 0: FID 16.8 against 43.6 on 5,000 samples), and its picture shows one class per column.
DEMO_GAN = "cdcgan-mnist"
# The VAE samples from the Gaussian mixture fitted to its latent codes (vae.prior, default gmm):
# after its 400 steps on 2 Ray workers that scored FID 18.5 with the preset's 40 components (25.0
# with 10) where N(0, I) scored 90.8 (AVX2 CPU).
DEMO_STEPS = {DEMO_GAN: 2500 if FAST else 1200, "vae-mnist": 400}
# A short run wants a faster recipe than the preset's (the DCGAN paper's lr 2e-4, tuned for long
# runs): with lr 1e-3 for G and D, dcgan-mnist reached FID 28 at 2,000 steps where lr 2e-4 scored
# 50 and lr 5e-4 31 (one process, bf16 + channels_last, 2,000 EMA samples).
DEMO_OVERRIDES = {DEMO_GAN: {"gan.lr_g": 1e-3, "gan.lr_d": 1e-3}, "vae-mnist": {}}
RETIRED = ("dcgan-mnist",)  # what earlier demos published and this one no longer trains
# Two Ray Train workers with one torch thread each: on 2 cores they ran the DCGAN at ~850 images/s
# in bf16, one worker with 2 threads at ~620 (its two threads wait on each other whenever Ray's
# own processes take a core; the plain loop without Ray reaches ~1,100).
WORKERS = 2
FID_SAMPLES = 5000
# Colour, when Debian's emoji are installed (`make data-deps`): a VAE on 1,683 emoji at 32 px for
# about a minute. At that budget a GAN's or a VAE's samples are still coloured blobs (the ResNet GAN
# scored FID 49.6 after 100k images, six minutes: docs/quality-colour.md), so the picture shows
# what a VAE does well early: reconstruct and inpaint. vae-mnist's network with a 64-d latent
# reconstructed better after 800 steps than the preset's 16-d one (16.9 vs 15.9 dB, PSNR of the
# mean squared error); the ResNet VAE no better at
# half the speed.
COLOUR_PRESET = "vae-mnist"
COLOUR_STEPS = 800 if FAST else 400
# vae-mnist fits a 40-component latent prior to its 16-d digit codes; 1,683 emoji in 64-d keep
# the default 10 (40 full 64-d covariances would hold 86k numbers, fitted to 108k in the codes).
COLOUR_OVERRIDES = {"model.z_dim": 64, "vae.prior_components": 10}
COLOUR_SHOWN = 16


def _prepared(source: str, folder: Path, opts=None) -> Path:
    """`folder`, prepared from `source` unless an earlier demo left it there."""
    from latentforge.data.prepare import prepare_dataset

    if (folder / "manifest.json").exists():
        print("   already prepared")
    else:
        prepare_dataset(source, folder, opts, log=lambda m: print(f"   {m}"))
    return folder


def _train(preset: str, steps: int, overrides: dict, data: Path, out: Path, run: str):
    """Train `preset` on Ray Train (WORKERS workers, the fast path) and load the final checkpoint."""
    from latentforge.checkpoint import load_checkpoint
    from latentforge.config import load_experiment
    from latentforge.train.ray_train import train_ray

    cfg = load_experiment(preset, {"train.steps": steps, "train.checkpoint_every": steps,
                                   "train.sample_every": steps // 4, "train.log_every": 100, **FAST_PATH, **overrides})
    result = train_ray(cfg, data, workers=WORKERS, out=run, storage=str(out / "runs"))
    return load_checkpoint(result["run_dir"])


def _publish(ckpt, dataset, registry: Path, name: str, feature_net=None) -> None:
    """Store the checkpoint's edit directions and promote it into the demo's registry."""
    from latentforge.editing.directions import compute_directions, save_directions
    from latentforge.registry import promote

    save_directions(ckpt.path, compute_directions(ckpt, dataset, feature_net))
    promote(ckpt.path, str(registry), name, overwrite=True)


def main() -> int:
    os.environ.setdefault("WANDB_MODE", "offline")
    from latentforge.data.dataset import PreparedDataset
    from latentforge.data.sources import emoji_installed
    from latentforge.host_memory import keep_freed_host_memory
    from latentforge.images import grid_png, to_model_range
    from latentforge.metrics.evaluate import distribution_metrics
    from latentforge.metrics.features import ensure_feature_net
    from latentforge.metrics.two_sample import c2st_accuracy
    from latentforge.sampling import generate
    from latentforge.storage import atomic_write_bytes

    keep_freed_host_memory()  # evaluation and editing run here too (host_memory.py)
    t0 = time.time()
    out = Path(os.environ.get("LATENTFORGE_DEMO_DIR", "demo-output")).resolve()
    data = out / "data" / "mnist5k"
    registry = out / "registry"
    for name in RETIRED:  # so that the playground offers what this demo trained, nothing stale
        if (registry / name).is_dir():
            shutil.rmtree(registry / name)
            print(f"   removed {name} from {registry}: an earlier demo's model, which this one replaces")
    colour = emoji_installed()
    stages = 4 if colour else 3
    print(f"== 1/{stages} data: {data}")
    ds = PreparedDataset(_prepared("mnist5k", data))
    real = to_model_range(ds.load("val").images)
    net = ensure_feature_net(data, log=lambda m: print(f"   {m}"))  # the classifier behind class edits

    pictures = []
    run_name = time.strftime("%Y%m%d-%H%M%S")
    for i, (preset, steps) in enumerate(DEMO_STEPS.items(), start=2):
        path = "bf16 autocast + channels_last" if FAST else "fp32 + channels_last (this CPU has no native bf16)"
        print(f"== {i}/{stages} train {preset} for {steps} steps on {WORKERS} Ray Train workers, {path}")
        ckpt = _train(preset, steps, DEMO_OVERRIDES[preset], data, out, f"{preset}-{run_name}")
        classes = ckpt.inference_generator().num_classes
        images, _, _ = generate(ckpt, 8 * classes if classes else 64, seed=0)  # labels cycle: a class per column
        grid = out / f"{preset}-samples.png"
        atomic_write_bytes(grid, grid_png(images, nrow=classes or None))
        fakes, _, _ = generate(ckpt, FID_SAMPLES, seed=1, max_n=None)
        fid = distribution_metrics(fakes, net, "train")["fid"]
        fid_small = distribution_metrics(fakes[: len(real)], net, "train")["fid"]  # like for like with the floor
        acc = c2st_accuracy(real, fakes[: len(real)], steps=150)
        standard_fid = None
        if ckpt.latent_prior is not None:  # what the VAE's fitted prior contributes, from the same weights
            plain, _, _ = generate(ckpt, FID_SAMPLES, seed=1, max_n=None, standard_prior=True)
            standard_fid = distribution_metrics(plain, net, "train")["fid"]
        pictures.append((preset, grid, ckpt.path.parent / "samples", acc, fid, fid_small, standard_fid))
        _publish(ckpt, ds, registry, preset, net)
    if colour:
        print(f"== 4/{stages} colour: train a VAE on emoji for {COLOUR_STEPS} steps, then reconstruct and inpaint")
        colour_result = colour_stage(out, registry, run_name)
    else:
        colour_result = None
        print("   (install Debian's colour emoji with `make data-deps` and the demo shows colour editing too)")

    print(f"\n== done in {time.time() - t0:.0f}s. Pictures to look at:")
    floor = distribution_metrics(real, net, "train")["fid"]
    for preset, grid, samples, acc, fid, fid_small, standard_fid in pictures:
        print(f"   {grid}   ({preset}; training progress in {samples}/)")
        print(f"      FID {fid:.1f}: the distance between {FID_SAMPLES:,} of its samples and the training digits in the "
              f"features of the dataset's own classifier (lower is better; an untrained generator scores several "
              f"hundred). FID depends on the sample count: on {len(real)} of its samples it scores {fid_small:.1f}, "
              f"where the {len(real)} real held-out digits score {floor:.1f}")
        print(f"      a fresh classifier tells its samples from real digits with {acc:.0%} accuracy "
              f"(100% = obviously fake, 50% = indistinguishable)")
        if standard_fid is not None:
            print(f"      its samples come from a Gaussian mixture fitted to the training digits' latent codes; "
                  f"drawn from N(0, I), as VAEs usually sample, they score FID {standard_fid:.1f}")
    if colour_result:
        grid, recon_psnr, fill_psnr, mean_psnr = colour_result
        print(f"   {grid}   (colour: rows are real emoji, the VAE's reconstructions, the centre hidden, "
              f"and the VAE's inpainting)")
        print(f"      reconstruction PSNR {recon_psnr:.1f} dB on the held-out emoji (higher is better); inpainting "
              f"fills the hidden centre at {fill_psnr:.1f} dB, where the average training emoji scores "
              f"{mean_psnr:.1f} dB")
    print("   generate more: latentforge generate <run folder> --n 64 --seed 1 --out more.png")
    print(f"\n   Try {'the three' if colour_result else 'both'} models in the editing playground (generate, edit with sliders, interpolate, inpaint):")
    print(f"      latentforge serve --registry {registry} --port 8000")
    print("      then open http://127.0.0.1:8000/ (API docs at /docs); Ctrl-C stops it")
    return 0


def colour_stage(out: Path, registry: Path, run_name: str) -> tuple[Path, float, float, float]:
    """Prepare emoji at 32 px, train a VAE on Ray Train, write a picture of reconstructions and
    inpainting, and promote the model (with its directions) as 'emoji-vae'.

    Returns:
        (the picture, reconstruction PSNR on the validation split, inpainting PSNR of the hidden
        centre on the pictured images, and the same for filling it with the mean training image)
    """
    import torch

    from latentforge.data.dataset import PreparedDataset
    from latentforge.data.sources import SourceOptions
    from latentforge.editing.inversion import encode_vae
    from latentforge.editing.quality import centre_mask, masked_psnr
    from latentforge.editing.restoration import inpaint
    from latentforge.images import grid_png, to_model_range
    from latentforge.metrics.reconstruction import psnr
    from latentforge.storage import atomic_write_bytes

    data = _prepared("emoji", out / "data" / "emoji32", SourceOptions(size=32))
    ds = PreparedDataset(data)
    ckpt = _train(COLOUR_PRESET, COLOUR_STEPS, COLOUR_OVERRIDES, data, out, f"emoji-vae-{run_name}")
    vae = ckpt.inference_generator().eval()
    val = to_model_range(ds.load("val").images)
    with torch.no_grad():
        recon = encode_vae(vae, val).reconstruction.clamp(-1, 1)
    recon_psnr = float(psnr(recon, val).mean())  # as edit-eval and evaluate report it
    shown = val[:COLOUR_SHOWN]
    mask = centre_mask(len(shown), *shown.shape[1:])
    filled, _ = inpaint(vae, "vae", shown, mask)
    mean_fill = to_model_range(ds.load("train").images).mean(0, keepdim=True).expand_as(shown)
    rows = torch.cat([shown, recon[:COLOUR_SHOWN], shown * mask, filled.clamp(-1, 1)])
    grid = out / "emoji-vae-editing.png"
    atomic_write_bytes(grid, grid_png(rows, nrow=COLOUR_SHOWN))
    _publish(ckpt, ds, registry, "emoji-vae")
    return (grid, recon_psnr, float(masked_psnr(filled, shown, mask).mean()),
            float(masked_psnr(mean_fill, shown, mask).mean()))


if __name__ == "__main__":
    sys.exit(main())
