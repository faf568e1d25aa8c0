"""The `latentforge` command. Heavy imports (torch, Ray) happen inside the verbs.

Each verb is two functions side by side, in the order `latentforge --help` lists them:
`add_<verb>(verbs)` declares its arguments and `cmd_<verb>(args)` does the work. A handler
returns its result as a dict (or None); `main` prints it as one JSON object on the last line of
stdout when the verb was given `--json`, so scripts can read `stdout.splitlines()[-1]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, TypeAlias

from latentforge.config import DATA_LOADERS, MAX_SEED  # pydantic and yaml only: the CLI stays quick to start

if TYPE_CHECKING:
    from latentforge.serve.config import ServeConfig

# What `add_subparsers()` returns; every `add_<verb>` registers its verb on one of these.
Verbs: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
# What a handler returns: the object `--json` prints, or None for verbs without `--json`.
Result: TypeAlias = "dict[str, Any] | None"


def add_json_flag(p: argparse.ArgumentParser) -> None:
    """The `--json` flag: one help text for every verb that has it; `main` does the printing."""
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line of stdout")


def seed_arg(text: str) -> int:
    """argparse type of every seed flag: a whole number in 0..2^63-1, the range configs and the API take.

    Raises:
        argparse.ArgumentTypeError: anything else (argparse names the flag and exits with status 2).
    """
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: give a seed in 0..{MAX_SEED}") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{seed} is out of range: give a seed in 0..{MAX_SEED}")
    return seed


def seed_list_arg(text: str) -> tuple[int, ...]:
    """argparse type of `--seeds 0,1,2`: each a `seed_arg`; an empty list means (0,)."""
    return tuple(seed_arg(s.strip()) for s in text.split(",") if s.strip()) or (0,)


def _print_json_last(obj: dict) -> None:
    from latentforge.storage import finite_json

    print(json.dumps(finite_json(obj), sort_keys=True, default=str))  # NaN is no JSON: jq and browsers refuse it


def _overrides(args: argparse.Namespace) -> dict:
    from latentforge.config import parse_override

    out = dict(parse_override(item) for item in (args.set or []))
    if getattr(args, "steps", None) is not None:
        out["train.steps"] = args.steps
    if getattr(args, "seed", None) is not None:
        out["train.seed"] = args.seed
    return out


# ------------------------------------------------------------------------------------------ data
def add_data(verbs: Verbs) -> Verbs:
    """The `data` group; returns its sub-verbs for `add_data_prepare` and `add_data_features`."""
    return verbs.add_parser("data", help="prepare datasets").add_subparsers(dest="data_verb", required=True)


def add_data_prepare(data: Verbs) -> None:
    prep = data.add_parser("prepare", help="turn a source into a prepared Parquet dataset folder")
    prep.add_argument("source", help="mnist5k | digits | shapes | crawl-tiles | emoji | fashion-mnist | folder:PATH | torchvision:NAME[:ROOT] | parquet:PATH")
    prep.add_argument("--out", required=True, help="dataset folder to create")
    prep.add_argument("--size", type=int, help="centre-crop and resize images to SIZE x SIZE")
    prep.add_argument("--channels", type=int, choices=[1, 3], help="convert every image to 1 or 3 channels")
    prep.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation (default 0.1)")
    prep.add_argument("--split-seed", type=seed_arg, default=0, help="seed of the train/val split")
    prep.add_argument("--skip-bad", action="store_true", help="skip and count unreadable images instead of failing")
    prep.add_argument("--count", type=int, help="images to draw (shapes) or a cap (other sources)")
    prep.add_argument("--seed", type=seed_arg, default=0, help="seed of generated sources (shapes)")
    prep.add_argument("--download", action="store_true", help="torchvision: allow downloading (needs internet)")
    prep.add_argument("--image-column", default="image", help="parquet: the encoded-image column")
    prep.add_argument("--label-column", default="label", help="parquet: the integer label column, if any")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    prep.add_argument("--features", action=argparse.BooleanOptionalAction, default=True,
                      help="also train the dataset's evaluation feature network (default on)")
    add_json_flag(prep)
    prep.set_defaults(func=cmd_data_prepare)


def cmd_data_prepare(args: argparse.Namespace) -> Result:
    from latentforge.data.prepare import prepare_dataset
    from latentforge.data.sources import SourceOptions

    opts = SourceOptions(size=args.size, channels=args.channels, skip_bad=args.skip_bad, count=args.count,
                         seed=args.seed, download=args.download, image_column=args.image_column,
                         label_column=args.label_column)
    manifest = prepare_dataset(args.source, args.out, opts, val_fraction=args.val_fraction,
                               split_seed=args.split_seed, overwrite=args.overwrite)
    if args.features:
        from latentforge.metrics.features import train_feature_net

        train_feature_net(args.out)
    return {"out": str(args.out), **{k: manifest[k] for k in ("num_images", "num_classes", "image_shape", "content_hash")},
            "skipped": manifest["skipped"]["count"]}


def add_data_features(data: Verbs) -> None:
    feat = data.add_parser("features", help="(re)train a prepared dataset's evaluation feature network")
    feat.add_argument("dataset", help="prepared dataset folder")
    feat.add_argument("--epochs", type=int, help="training epochs (default: about 50k images' worth)")
    feat.add_argument("--seed", type=seed_arg, default=0)
    add_json_flag(feat)
    feat.set_defaults(func=cmd_data_features)


def cmd_data_features(args: argparse.Namespace) -> Result:
    from latentforge.metrics.features import train_feature_net

    return train_feature_net(args.dataset, epochs=args.epochs, seed=args.seed)


def add_device_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help=f"{what} (default cpu)")


def chosen_device(device: str) -> str:
    """`--device`, refused (with the way out) where it names a GPU this process cannot see."""
    from latentforge.devices import inference_device

    return inference_device(device, "--device cuda", "drop --device to run on the CPU")


# ------------------------------------------------------------------------------------------ evaluate
def add_evaluate(verbs: Verbs) -> None:
    ev = verbs.add_parser("evaluate", help="score a checkpoint or generated images against a dataset")
    ev.add_argument("target", help="checkpoint or run folder, a folder of images, or an .npz of uint8 images")
    ev.add_argument("--data", required=True, help="prepared dataset folder (its feature network is the backbone)")
    ev.add_argument("--samples", type=int, default=5000, help="images to generate (checkpoints)")
    ev.add_argument("--seed", type=seed_arg, default=0, help="latent seed")
    ev.add_argument("--reference", choices=["train", "val"], default="train", help="real split to compare with")
    ev.add_argument("--no-ema", dest="ema", action="store_false",
                    help="GANs: score the raw generator instead of its EMA copy (what EMA contributes, from one run)")
    ev.add_argument("--standard-prior", action="store_true",
                    help="VAEs: sample N(0, I) instead of the latent prior fitted in training (what the prior contributes)")
    ev.add_argument("--inception", metavar="WEIGHTS", help="use torchvision Inception-v3 weights from this file as the "
                    "backbone (the ImageNet FID backbone; not the TF FID-Inception of published numbers) instead of the dataset's "
                    "feature network")
    ev.add_argument("--inception-protocol", choices=["clean", "legacy"], default="clean",
                    help="how images reach Inception: clean (8-bit, antialiased bicubic resize, as clean-fid) or "
                         "legacy (bilinear float resize, as pytorch-fid/torchmetrics); results name it")
    add_json_flag(ev)
    add_device_flag(ev, "generate and embed the samples on this device (cuda: a GPU for 50,000 samples)")
    ev.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> Result:
    from latentforge.metrics.evaluate import evaluate

    result = evaluate(args.target, args.data, samples=args.samples, seed=args.seed, reference=args.reference,
                      inception=args.inception, ema=args.ema, inception_protocol=args.inception_protocol,
                      standard_prior=args.standard_prior, device=chosen_device(args.device))
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return result


# ------------------------------------------------------------------------------------------ train
def add_train(verbs: Verbs) -> None:
    tr = verbs.add_parser("train", help="train a preset or YAML config")
    tr.add_argument("config", nargs="?", help="preset name (see `latentforge presets`) or YAML file")
    tr.add_argument("--data", help="prepared dataset folder (required; with --resume, default: the run's own)")
    tr.add_argument("--workers", type=int, default=2, help="Ray Train workers; 0 trains in this process without Ray")
    tr.add_argument("--gpus", action="store_true", help="one GPU per worker (NCCL)")
    tr.add_argument("--steps", type=int, help="override train.steps")
    tr.add_argument("--seed", type=seed_arg, help="override train.seed")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any field, e.g. gan.lr_g=1e-4")
    tr.add_argument("--out", help="the run folder, a path or URI, for every --workers (with --storage: a name under it); "
                    "default: a unique name under --storage")
    tr.add_argument("--storage", help="where run folders go: a path or URI (s3://, gs://, file://); default ./runs")
    tr.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from (default 2)")
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its latest checkpoint")
    tr.add_argument("--address", help="join an existing Ray cluster (default: start a local one)")
    tr.add_argument("--data-loader", choices=DATA_LOADERS, default="stream",
                    help="stream: exact seeded epochs streamed from the Parquet row groups (default); memory: the "
                         "split in each worker's memory; ray: Ray Data shards (local shuffle buffer, not exact)")
    add_json_flag(tr)
    tr.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> Result:
    from latentforge.config import load_experiment
    from latentforge.errors import ConfigError
    from latentforge.train.run_dir import read_run_config, read_run_data, resolve_run_dir

    if args.resume:
        from latentforge.config import apply_overrides, experiment_to_dict, parse_experiment

        if args.out or args.storage:
            raise ConfigError("--resume RUN continues that run folder; drop --out/--storage")
        resumed = resolve_run_dir(resume=args.resume)
        base = read_run_config(resumed)
        cfg = parse_experiment(apply_overrides(experiment_to_dict(base), _overrides(args)), f"run {args.resume}")
        if not args.data:  # the dataset the run was started on (run.json); checked by content hash on resume
            args.data = read_run_data(resumed)
            if not args.data:
                raise ConfigError(f"{args.resume} does not record its dataset; give --data DIR")
            print(f"data: {args.data} (the run's own)")
    elif not args.data:
        raise ConfigError("give --data DIR, a prepared dataset folder (latentforge data prepare)")
    elif not args.config:
        raise ConfigError("give a PRESET_OR_YAML to train (see `latentforge presets`), or --resume RUN_DIR")
    else:
        cfg = load_experiment(args.config, _overrides(args))
    if args.workers == 0:
        from latentforge.data.dataset import PreparedDataset
        from latentforge.train.local import train_local

        if args.data_loader != "stream":
            raise ConfigError(f"--data-loader {args.data_loader} applies to Ray workers; --workers 0 always streams "
                              "(the same batches as memory for a split that fits one shuffle window)")
        run = resolve_run_dir(args.out, args.storage, args.resume, cfg.name)
        if not run.is_local:
            raise ConfigError(f"{run.uri} is remote storage: --workers 0 writes local folders; use --workers 1 or more")
        PreparedDataset(args.data)  # a wrong --data fails here, before the run folder exists
        if args.gpus:
            from latentforge.devices import require_cuda

            require_cuda("--gpus", "drop --gpus to train on the CPU")
        run.path.mkdir(parents=True, exist_ok=True)
        print(f"run folder: {run.uri}")
        record = train_local(cfg, args.data, run.path, resume=bool(args.resume), device="cuda" if args.gpus else "cpu")
        result = {"run_dir": run.uri, **record}
    else:
        from latentforge.train.ray_train import train_ray

        result = train_ray(cfg, args.data, workers=args.workers, use_gpu=args.gpus, out=args.out,
                           storage=args.storage, max_failures=args.max_failures, resume=args.resume,
                           address=args.address, data_loader=args.data_loader)
    print(f"done: run folder {result['run_dir']}, samples in {result['run_dir']}/samples/")
    return result


# ------------------------------------------------------------------------------------------ generate
def add_generate(verbs: Verbs) -> None:
    gen = verbs.add_parser("generate", help="write a grid of generated images")
    gen.add_argument("checkpoint", help="checkpoint folder or run folder (latest checkpoint)")
    gen.add_argument("--n", type=int, default=64, help="number of images (1..4096)")
    gen.add_argument("--seed", type=seed_arg, default=0, help="latent seed: the same seed gives the same bytes")
    gen.add_argument("--label", type=int, help="class for conditional models (default: cycle through classes)")
    gen.add_argument("--truncation", type=float, help="truncation: latents cut to |z| <= T for z-space models; for W-space models (StyleGAN2) "
                     "StyleGAN's psi, w pulled towards the mean w (1 = none)")
    gen.add_argument("--precision", choices=["fp32", "bf16"],
                     help="forward-pass precision (default: the precision the model trained in)")
    gen.add_argument("--standard-prior", action="store_true",
                     help="VAEs: sample N(0, I) instead of the latent prior fitted in training")
    gen.add_argument("--out", required=True, help="PNG file to write")
    add_device_flag(gen, "run the generator on this device")
    gen.set_defaults(func=cmd_generate)


def _check_truncation(truncation: float | None) -> None:
    """The API's rule for truncation (serve.schemas), so the CLI refuses what it refuses (seeds: `seed_arg`).

    Raises:
        ConfigError: a truncation that is not a number in (0, 10].
    """
    import math

    from latentforge.errors import ConfigError
    from latentforge.serve.schemas import MAX_TRUNCATION

    if truncation is not None and not (math.isfinite(truncation) and 0 < truncation <= MAX_TRUNCATION):
        raise ConfigError(f"--truncation {truncation} is not a number in (0, {MAX_TRUNCATION:g}]: latents are "
                          f"truncated to |z| <= T, so T must be positive and finite")


def cmd_generate(args: argparse.Namespace) -> Result:
    from latentforge.checkpoint import load_checkpoint
    from latentforge.images import grid_png
    from latentforge.sampling import generate
    from latentforge.storage import atomic_write_bytes

    _check_truncation(args.truncation)
    ckpt = load_checkpoint(args.checkpoint, device=chosen_device(args.device))
    images, _, _ = generate(ckpt, args.n, args.seed, label=args.label, truncation=args.truncation,
                            precision=args.precision, standard_prior=args.standard_prior)
    atomic_write_bytes(args.out, grid_png(images))
    print(f"wrote {args.n} images from {ckpt.path} (step {ckpt.step}, seed {args.seed}) to {args.out}")
    return None


# ------------------------------------------------------------------------------------------ bench
def add_bench(verbs: Verbs) -> Verbs:
    """The `bench` group; returns its sub-verbs for the `add_bench_*` functions below."""
    return verbs.add_parser("bench", help="benchmarks that print side-by-side ratios").add_subparsers(
        dest="bench_verb", required=True)


def add_bench_train(bench: Verbs) -> None:
    bt = bench.add_parser("train", help="plain loop vs Ray Train with 1 and 2 workers: images/s, ratios, GFLOP/s")
    bt.add_argument("--preset", default="dcgan-mnist", help="preset to train (default dcgan-mnist)")
    bt.add_argument("--data", help="prepared dataset (default: mnist5k prepared in a temp folder)")
    bt.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    bt.add_argument("--steps", type=int, default=100, help="timed steps")
    bt.add_argument("--data-loader", choices=DATA_LOADERS, default="stream", help="Ray workers' data path")
    bt.add_argument("--gpus", action="store_true", help="run on CUDA (one GPU per worker)")
    bt.add_argument("--modes", default="fp32,fp32+channels_last,bf16,bf16+channels_last",
                    help="precision/layout modes of the plain loop, comma-separated ('' for none)")
    bt.add_argument("--rounds", type=int, default=5,
                    help="the modes' timed steps run in this many rounds, each timing every mode in turn (this "
                         "machine's speed drifts: each speed-up is the median of its rounds)")
    bt.add_argument("--ray-rounds", type=int, default=3,
                    help="Ray Train runs with 1 worker, each timed between two plain-loop runs (b/a is the median "
                         "of their ratios)")
    bt.add_argument("--ray-settle", type=float, metavar="SECONDS",
                    help="the Ray runs warm up for at least this many seconds of steps, past the cluster's "
                         "start-up (default 10; 0: --warmup steps, as the plain loop)")
    bt.add_argument("--no-ray", action="store_true", help="measure the modes only (no Ray Train runs)")
    bt.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a preset field in every run, e.g. train.global_batch_size=512 for a GPU")
    add_json_flag(bt)
    bt.set_defaults(func=cmd_bench_train)


def cmd_bench_train(args: argparse.Namespace) -> Result:
    from latentforge.bench.train_bench import bench_train
    from latentforge.config import parse_override

    return bench_train(args.preset, args.data, warmup=args.warmup, steps=args.steps, data_loader=args.data_loader,
                       use_gpu=args.gpus, modes=_modes(args.modes), ray=not args.no_ray, rounds=args.rounds,
                       ray_rounds=args.ray_rounds,
                       **({} if args.ray_settle is None else {"ray_settle_s": args.ray_settle}),
                       overrides=dict(parse_override(item) for item in (args.set or [])))


def _modes(text: str) -> tuple[str, ...]:
    """A --modes list ('fp32,bf16+channels_last'), each checked against the benchmarks' modes."""
    from latentforge.bench.train_bench import MODES
    from latentforge.errors import ConfigError

    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ConfigError(f"--modes: unknown mode(s) {', '.join(unknown)}; choose from: {', '.join(MODES)}")
    return modes


def add_bench_eval(bench: Verbs) -> None:
    be = bench.add_parser("eval", help="time the evaluation of N samples, stage by stage")
    be.add_argument("--data", help="prepared dataset (default: mnist5k in a temp folder)")
    be.add_argument("--samples", type=int, default=5000)
    be.add_argument("--checkpoint", help="score this checkpoint's samples (default: an untrained DCGAN)")
    add_json_flag(be)
    be.set_defaults(func=cmd_bench_eval)


def cmd_bench_eval(args: argparse.Namespace) -> Result:
    from latentforge.bench.eval_bench import bench_eval

    return bench_eval(args.data, samples=args.samples, checkpoint=args.checkpoint)


def add_bench_quality(bench: Verbs) -> None:
    bq = bench.add_parser("quality", help="train each mnist preset for a fixed budget and write a quality table")
    bq.add_argument("--data", help="prepared mnist5k (default: prepared in a temp folder)")
    bq.add_argument("--steps", type=int, default=2000, help="training steps per preset")
    bq.add_argument("--samples", type=int, default=5000, help="samples scored per preset")
    bq.add_argument("--presets", nargs="*", help="presets to include (default: every mnist preset); PRESET@key=value,... "
                    "adds a variant with overrides, e.g. resnet-diffaug-mnist@gan.ema_decay=0 to measure what EMA gives")
    bq.add_argument("--out", default="quality.md", help="markdown file to write (rewritten after every row; docs/quality.md "
                    "holds the published table and its reading, so name it only to replace them)")
    bq.add_argument("--modes", default="fp32", help="precision/layout modes to train each preset in, comma-separated "
                    "(fp32, bf16, bf16+channels_last, ...): a row per preset and mode")
    bq.add_argument("--seeds", type=seed_list_arg, default=(0,), help="training seeds, comma-separated: a row per seed and their mean")
    add_json_flag(bq)
    bq.set_defaults(func=cmd_bench_quality)


def cmd_bench_quality(args: argparse.Namespace) -> Result:
    from latentforge.bench.quality import MNIST_PRESETS, bench_quality

    rows = bench_quality(args.data, steps=args.steps, samples=args.samples, presets=args.presets or MNIST_PRESETS,
                         out=args.out, modes=_modes(args.modes) or ("fp32",),
                         seeds=args.seeds)
    return {"rows": rows}


def add_bench_tune(bench: Verbs) -> None:
    btu = bench.add_parser("tune", help="naive sweep vs ASHA + instability stopper: steps and best FID")
    btu.add_argument("--data", help="prepared mnist5k (default: prepared in a temp folder)")
    btu.add_argument("--trials", type=int, default=8)
    btu.add_argument("--steps", type=int, default=600, help="steps per trial when not stopped")
    btu.add_argument("--seed", type=seed_arg, default=0, help="search seed (same trials in both sweeps)")
    add_json_flag(btu)
    btu.set_defaults(func=cmd_bench_tune)


def cmd_bench_tune(args: argparse.Namespace) -> Result:
    from latentforge.bench.tune_bench import bench_tune

    return bench_tune(args.data, trials=args.trials, steps=args.steps, seed=args.seed)


def add_bench_serve(bench: Verbs) -> None:
    bs = bench.add_parser("serve", help="Serve throughput/latency at concurrency 1, 8, 32, batching on and off")
    bs.add_argument("--checkpoint", help="model to serve (default: an untrained dcgan-mnist)")
    bs.add_argument("--n", type=int, default=4, help="images per request")
    bs.add_argument("--requests", type=int, default=12, help="requests per client")
    bs.add_argument("--mixed-seconds", type=float, default=0.0,
                    help="also run a mixed generate/edit/interpolate load of 32 clients for this long (e.g. 60)")
    bs.add_argument("--modes", default="default",
                    help="Ray Serve request-path modes to compare, one process each: default, throughput, haproxy "
                         "(comma-separated, e.g. default,throughput)")
    add_json_flag(bs)
    bs.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args: argparse.Namespace) -> Result:
    from latentforge.bench.serve_bench import bench_serve, bench_serve_modes

    kwargs = {"checkpoint": args.checkpoint, "n": args.n, "requests_per_client": args.requests,
              "mixed_seconds": args.mixed_seconds}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if modes == ["default"]:
        return bench_serve(**kwargs)
    return bench_serve_modes(modes, **kwargs)


# ------------------------------------------------------------------------------------------ edit-eval
def add_edit_eval(verbs: Verbs) -> None:
    ee = verbs.add_parser("edit-eval", help="measure inversion, inpainting, denoising, directions and interpolation")
    ee.add_argument("checkpoint", help="checkpoint or run folder")
    ee.add_argument("--data", required=True, help="prepared dataset folder (validation split, feature network)")
    ee.add_argument("--images", type=int, help="validation images to use (default 64 for GANs, 256 for VAEs)")
    ee.add_argument("--seed", type=seed_arg, default=0)
    ee.add_argument("--project-steps", type=int, default=150, help="Adam steps per GAN projection")
    ee.add_argument("--restarts", type=int, default=2, help="random starts per GAN projection")
    add_device_flag(ee, "run the model's projections and decoding on this device (cuda: a GPU for 64-256 px models)")
    add_json_flag(ee)
    ee.set_defaults(func=cmd_edit_eval)


def cmd_edit_eval(args: argparse.Namespace) -> Result:
    from latentforge.editing.quality import edit_eval

    result = edit_eval(args.checkpoint, args.data, images=args.images, seed=args.seed,
                       project_steps=args.project_steps, restarts=args.restarts, device=chosen_device(args.device))
    for k, v in result.items():
        print(f"{k:52s} {v:.4f}" if isinstance(v, float) else f"{k:52s} {v}")
    return result


# ------------------------------------------------------------------------------------------ tune
def add_tune(verbs: Verbs) -> None:
    tu = verbs.add_parser("tune", help="run a hyperparameter sweep (Ray Tune) and promote the best trial")
    tu.add_argument("sweep", help="sweep YAML (see jobs/sweeps/)")
    tu.add_argument("--data", required=True, help="prepared dataset folder")
    tu.add_argument("--out", help="sweep folder (default sweeps/<name>-<time>); with --resume, the sweep to continue")
    tu.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    tu.add_argument("--address", help="join an existing Ray cluster")
    tu.add_argument("--gpus", action="store_true",
                    help="one GPU per Ray Train worker of every trial (the sweep's gpus: true)")
    tu.add_argument("--registry", default="registry", help="promote the best trial here (default ./registry)")
    tu.add_argument("--no-promote", action="store_true", help="do not promote the best trial")
    add_json_flag(tu)
    tu.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> Result:
    from latentforge.tune.space import load_sweep
    from latentforge.tune.sweep import run_sweep

    if args.resume and not args.out:
        from latentforge.errors import ConfigError

        raise ConfigError("--resume needs --out SWEEP_DIR (the folder of the sweep to continue)")
    return run_sweep(load_sweep(args.sweep), args.data, out=args.out, resume=args.resume, address=args.address,
                     registry=None if args.no_promote else args.registry, gpus=args.gpus)


# ------------------------------------------------------------------------------------------ registry
def add_registry(verbs: Verbs) -> None:
    """`registry list | show | promote`; each sub-verb has its own handler below."""
    reg = verbs.add_parser("registry", help="list, show and promote registered models")
    reg_verbs = reg.add_subparsers(dest="registry_verb", required=True)
    for verb, handler in (("list", cmd_registry_list), ("show", cmd_registry_show),
                          ("promote", cmd_registry_promote)):
        r = reg_verbs.add_parser(verb)
        r.add_argument("--registry", default="registry", help="registry folder or URI (default ./registry)")
        add_json_flag(r)
        if verb == "show":
            r.add_argument("name")
        if verb == "promote":
            r.add_argument("checkpoint", help="checkpoint or run folder (latest checkpoint)")
            r.add_argument("--name", help="registry name: a-z, 0-9, '.', '_', '-' (default: the experiment's name, "
                           "e.g. dcgan-mnist)")
            r.add_argument("--overwrite", action="store_true")
        r.set_defaults(func=handler)


def cmd_registry_list(args: argparse.Namespace) -> Result:
    from latentforge import registry

    entries = registry.list_entries(args.registry)
    if not entries:
        print(f"no models in {args.registry}")
    for e in entries:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(e.get("metrics", {}).items()) if isinstance(v, (int, float)))
        print(f"{e['name']:24s} {e['algorithm']:4s} step {e['step']:>6}  {metrics}")
    return {"models": entries}


def cmd_registry_show(args: argparse.Namespace) -> Result:
    from latentforge import registry

    entry = registry.show(args.registry, args.name)
    print(json.dumps(entry, indent=2, sort_keys=True))
    return entry


def cmd_registry_promote(args: argparse.Namespace) -> Result:
    from latentforge import registry

    entry = registry.promote(args.checkpoint, args.registry, args.name, overwrite=args.overwrite)
    lineage = entry["lineage"]
    what = (f"sweep {lineage['sweep']}'s best trial {lineage.get('trial_id')} ({lineage['source_checkpoint']})"
            if "sweep" in lineage else lineage["source_checkpoint"])
    print(f"promoted {what}, step {entry['step']}, to {args.registry} as {entry['name']!r}")
    return entry


# ------------------------------------------------------------------------------------------ serve
def add_serve(verbs: Verbs) -> None:
    # no abbreviations: `--api-key SECRET` must not be taken for --api-key-file and echoed back
    sv = verbs.add_parser("serve", help="serve the registry's models over HTTP (Ray Serve)", allow_abbrev=False)
    sv.add_argument("--registry", help="registry folder or URI (default ./registry)")
    sv.add_argument("--config", help="serve config YAML: ServeConfig fields (limits, batching, autoscaling, GPUs), or a "
                    "Ray Serve deployment file such as cluster/serve-config.yaml, whose LatentForge application's "
                    "args are taken")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--address", help="join an existing Ray cluster")
    sv.add_argument("--api-key-file", help="require the key in this file (X-API-Key or Authorization: Bearer); "
                    "or set LATENTFORGE_API_KEY. Never a key on the command line: argv is visible to every user")
    sv.add_argument("--allow-unauthenticated", action="store_true",
                    help="serve on a non-loopback --host without an API key (behind your own authenticating proxy)")
    sv.add_argument("--request-path", choices=("default", "throughput", "haproxy"), default="default",
                    help="Ray Serve's request path for the local cluster this starts: haproxy (HAProxy to the ingress "
                         "replicas, 2.4x batched throughput measured; needs an API key), throughput (Serve's "
                         "throughput-optimised mode), default (the Python proxy)")
    sv.set_defaults(func=cmd_serve)


def _serve_app_args(data: dict, source: str) -> tuple[dict, str]:
    """A Ray Serve deployment file's LatentForge application `args` (the ServeConfig fields); any
    other file as it is."""
    from latentforge.errors import ConfigError

    if "applications" not in data:
        return data, source
    apps = [a for a in data["applications"] or [] if isinstance(a, dict)
            and str(a.get("import_path", "")).startswith("latentforge.serve.app")]
    if len(apps) != 1:
        raise ConfigError(f"{source} is a Ray Serve deployment file with {len(apps)} LatentForge applications "
                          "(import_path latentforge.serve.app:build_app); --config takes one, or a file of "
                          "ServeConfig fields")
    ignored = [k for k in ("http_options", "proxy_location") if k in data] + [k for k in ("route_prefix", "runtime_env")
                                                                             if k in apps[0]]
    if ignored:
        import sys

        print(f"latentforge: note: serve --config reads the application's args from {source}; its "
              f"{', '.join(ignored)} do not apply here (--host, --port and this process's environment do)",
              file=sys.stderr)
    args = apps[0].get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{source}: the application's args must be a mapping of ServeConfig fields")
    return args, f"{source} (applications[{apps[0].get('name', '?')}].args)"


def _serve_config(config: str | None, registry: str | None = None, api_key_file: str | None = None,
                  allow_plugins: list[str] | None = None) -> ServeConfig:
    """The validated serve config: the YAML file `config` (defaults without one), then the
    command-line `registry` / `api_key_file` over it, `--allow-plugin` modules added to its
    `allow_plugins`, and LATENTFORGE_API_KEY from this process's environment where the config
    names no key source. The overrides are validated too.

    Raises:
        ConfigError: a missing or unreadable file, or every invalid field, each named.
    """
    from pydantic import ValidationError

    from latentforge.config import format_validation_error, load_yaml_model
    from latentforge.errors import ConfigError
    from latentforge.serve.config import ServeConfig

    import os

    updates = {k: v for k, v in (("registry", registry), ("api_key_file", api_key_file)) if v}
    base = load_yaml_model(config, ServeConfig, "serve config", select=_serve_app_args).model_dump() if config else {}
    if base.get("api_key") is not None:
        base["api_key"] = base["api_key"].get_secret_value()
    has_source = any(base.get(k) or updates.get(k) for k in ("api_key", "api_key_file", "api_key_env"))
    if not has_source and os.environ.get("LATENTFORGE_API_KEY"):  # read here, by the driver, not by a replica
        updates["api_key"] = os.environ["LATENTFORGE_API_KEY"]
    if allow_plugins:
        updates["allow_plugins"] = sorted(set(base.get("allow_plugins", [])) | set(allow_plugins))
    try:
        # ServeConfig is frozen and model_copy(update=...) would skip validation: rebuild instead
        return ServeConfig.model_validate(base | updates)
    except ValidationError as e:
        source = f"{config} with the command-line flags" if config else "from the command line"
        raise ConfigError(format_validation_error(e, source, "serve config")) from e


def cmd_serve(args: argparse.Namespace) -> Result:
    cfg = _serve_config(args.config, args.registry, args.api_key_file, args.allow_plugin)  # a bad file fails before Ray starts
    from latentforge.serve.runner import check_exposure, serve_forever

    check_exposure(cfg, args.host, args.allow_unauthenticated, args.request_path)
    serve_forever(cfg, args.host, args.port, args.address, allow_unauthenticated=args.allow_unauthenticated,
                  request_path=args.request_path)
    return None


# ------------------------------------------------------------------------------------------ directions
def add_directions(verbs: Verbs) -> None:
    dr = verbs.add_parser("directions", help="compute and save a checkpoint's edit directions")
    dr.add_argument("checkpoint", help="checkpoint or run folder")
    dr.add_argument("--data", required=True, help="its prepared dataset (labels, attributes, classifier)")
    dr.add_argument("--k", type=int, default=5, help="unsupervised directions per method")
    dr.set_defaults(func=cmd_directions)


def cmd_directions(args: argparse.Namespace) -> Result:
    from latentforge.checkpoint import load_checkpoint, resolve_checkpoint
    from latentforge.data.dataset import PreparedDataset
    from latentforge.editing.directions import compute_directions, save_directions
    from latentforge.editing.space import edit_model
    from latentforge.errors import ConfigError
    from latentforge.metrics.features import ensure_feature_net

    path = resolve_checkpoint(args.checkpoint)
    ck = load_checkpoint(path)
    dataset = PreparedDataset(args.data)
    ck.check_dataset(dataset)
    z_dim = edit_model(ck.inference_generator()).z_dim
    if not 1 <= args.k <= z_dim:
        raise ConfigError(f"--k {args.k} is out of range: a model with {z_dim}-d latents has 1..{z_dim} directions per "
                          "method")
    dirs = compute_directions(ck, dataset, ensure_feature_net(args.data), k=args.k)
    folder = save_directions(path, dirs)
    for d in dirs:
        print(f"{d.name:16s} {d.method:22s} {d.meta}")
    print(f"saved {len(dirs)} directions in {folder}")
    return None


# ------------------------------------------------------------------------------------------ fit-prior
def add_fit_prior(verbs: Verbs) -> None:
    fp = verbs.add_parser("fit-prior", help="fit (or refit) a VAE checkpoint's latent prior to its training images")
    fp.add_argument("checkpoint", help="VAE checkpoint or run folder (latest checkpoint)")
    fp.add_argument("--data", required=True, help="the prepared dataset it trained on")
    fp.add_argument("--components", type=int, help="mixture components (default: the run's vae.prior_components, 10)")
    fp.add_argument("--images", type=int, help="training images to encode (default: the run's vae.prior_images, 10000)")
    fp.add_argument("--seed", type=seed_arg, help="seeds the image sample and the EM starts (default: the run's train.seed)")
    add_json_flag(fp)
    fp.set_defaults(func=cmd_fit_prior)


def cmd_fit_prior(args: argparse.Namespace) -> Result:
    """Fit the prior that training fits at every checkpoint (see `models.prior`) to a checkpoint
    saved without one (before priors were fitted, or with `vae.prior=standard`), or refit it with
    other settings, and write it into the checkpoint."""
    import torch

    from latentforge.algorithms.vae import fit_latent_prior
    from latentforge.checkpoint import LATENT_PRIOR, load_checkpoint, set_modules
    from latentforge.data.dataset import PreparedDataset
    from latentforge.errors import CheckpointError, ConfigError
    from latentforge.models.prior import MAX_COMPONENTS
    from latentforge.registry import is_registry_entry

    ckpt = load_checkpoint(args.checkpoint)
    if ckpt.algorithm != "vae":
        raise ConfigError(f"{ckpt.path} is a {ckpt.algorithm.upper()} checkpoint: a latent prior is fitted to a "
                          "VAE's encoder, and GANs sample N(0, I) by design")
    run = ckpt.experiment
    given = lambda value, default: default if value is None else value  # noqa: E731 (0 is not "unset")
    components = given(args.components, run.get("vae", {}).get("prior_components", 10))
    images = given(args.images, run.get("vae", {}).get("prior_images", 10000))
    seed = given(args.seed, run.get("train", {}).get("seed", 0))
    if not 1 <= components <= MAX_COMPONENTS:
        raise ConfigError(f"--components {components} is out of range: give 1..{MAX_COMPONENTS}")
    if images < 1:
        raise ConfigError(f"--images {images} must be at least 1")
    registry_copy = next((p for p in (ckpt.path, ckpt.path.parent) if is_registry_entry(p)), None)
    if registry_copy is not None:
        raise ConfigError(f"{ckpt.path} is a registry's copy of a model ({registry_copy}), checked against its recorded "
                          "hashes: fit the prior in the run's checkpoint, then `latentforge registry promote CKPT "
                          "--name NAME --overwrite`")
    dataset = PreparedDataset(args.data)
    ckpt.check_dataset(dataset)
    sample = dataset.sample("train", images, seed=seed)
    try:
        fit = fit_latent_prior(ckpt.modules["vae"], sample.images, sample.labels, components, seed=seed)
    except (ValueError, torch.linalg.LinAlgError) as e:  # a diverged model, or degenerate latents
        raise CheckpointError(f"cannot fit a prior to {ckpt.path}: {e}") from e
    replaced = ckpt.latent_prior is not None
    set_modules(ckpt.path, {LATENT_PRIOR: fit.prior})
    result = {"checkpoint": str(ckpt.path), "components": fit.prior.components, "images": fit.samples,
              "iterations": fit.iterations, "log_likelihood": fit.log_likelihood,
              "standard_log_likelihood": fit.standard_log_likelihood, "replaced": replaced}
    print(f"{'refitted' if replaced else 'fitted'} a {fit.prior.components}-component Gaussian mixture to "
          f"{fit.samples:,} training images' posterior means in {fit.iterations} EM iterations (mean "
          f"log-likelihood {fit.log_likelihood:.1f} nats against {fit.standard_log_likelihood:.1f} under N(0, I)); "
          f"saved in {ckpt.path}. generate and evaluate sample from it now; a model promoted before needs "
          "`latentforge registry promote ... --overwrite` to serve it")
    return result


# ------------------------------------------------------------------------------------------ presets
def add_presets(verbs: Verbs) -> None:
    pr = verbs.add_parser("presets", help="list the shipped presets")
    pr.set_defaults(func=cmd_presets)


def cmd_presets(args: argparse.Namespace) -> Result:
    from latentforge.config import load_experiment, preset_names

    for name in preset_names():
        cfg = load_experiment(name)
        print(f"{name:20s} {cfg.algorithm:4s} {cfg.description}")
    return None


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """Every verb, in the order `latentforge --help` lists them."""
    p = argparse.ArgumentParser(prog="latentforge", description="Train, tune and serve GANs and VAEs on Ray.")
    p.add_argument("--allow-plugin", action="append", default=[], metavar="MODULE",
                   help="allow loading checkpoints whose architecture comes from this module (a plug-in, "
                        "model.arch: package.module:Class); repeatable; also LATENTFORGE_PLUGINS=a,b")
    verbs = p.add_subparsers(dest="verb", required=True)
    data = add_data(verbs)
    add_data_prepare(data)
    add_data_features(data)
    add_evaluate(verbs)
    add_train(verbs)
    add_generate(verbs)
    bench = add_bench(verbs)
    add_bench_train(bench)
    add_bench_eval(bench)
    add_bench_quality(bench)
    add_bench_tune(bench)
    add_bench_serve(bench)
    add_edit_eval(verbs)
    add_tune(verbs)
    add_registry(verbs)
    add_serve(verbs)
    add_directions(verbs)
    add_fit_prior(verbs)
    add_presets(verbs)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one verb.

    Returns:
        0 on success, 2 on a LatentForgeError (its message on stderr), 130 on Ctrl-C.
    """
    from latentforge.errors import LatentForgeError

    args = build_parser().parse_args(argv)
    try:
        if args.allow_plugin:
            from latentforge.models.plugins import allow_plugins

            allow_plugins(args.allow_plugin)
        from latentforge.host_memory import keep_freed_host_memory

        kept = keep_freed_host_memory()  # every verb loops over batches of tensors (host_memory.py)
        if "not understood" in kept:
            print(f"latentforge: warning: host memory {kept}", file=sys.stderr)
        result = args.func(args)
        if getattr(args, "json", False) and result is not None:
            _print_json_last(result)  # last, after anything the verb printed
        return 0
    except LatentForgeError as e:
        print(f"latentforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("latentforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
