"""Self-describing checkpoint folders.

    config.json         what this is: format, package version, algorithm, step, the experiment
                        config, the data spec (shape, classes, dataset content hash), and for
                        each module its registered class name and constructor arguments
    model.safetensors   weights of every module, keys prefixed by module name
                        (generator, discriminator, generator_ema | vae[, latent_prior])
    training_state.pt   optimisers, step, RNG states, data position; loaded with
                        weights_only=True (plain tensors and containers only)

Loading needs only the folder. Classes come from the model registry, weights from safetensors:
nothing in a checkpoint is ever unpickled as code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file
from torch import nn

from latentforge import __version__
from latentforge.data.spec import DataSpec
from latentforge.errors import CheckpointError, DataError
from latentforge.models.architectures import build_module, describe
from latentforge.storage import atomic_write_bytes, atomic_write_json, read_json, staged_dir

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TRAINING_STATE = "training_state.pt"
CHECKPOINT_KIND = "latentforge.checkpoint"
LATENT_PRIOR = "latent_prior"  # the module name of a VAE's fitted prior
FORMAT_VERSION = 1


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: modules in eval mode on the requested device."""

    path: Path
    config: dict  # the whole config.json
    modules: dict[str, nn.Module]
    step: int
    algorithm: str  # 'gan' | 'vae'
    data: DataSpec

    @property
    def experiment(self) -> dict:
        return self.config["experiment"]

    @property
    def precision(self) -> str:
        """The precision the model trained in ('fp32' or 'bf16'): inference uses it by default."""
        return self.experiment.get("train", {}).get("precision", "fp32")

    @property
    def inference_only(self) -> bool:
        """An inference copy (a registry's): the EMA generator or the VAE and its prior, no training modules."""
        return _is_inference_copy(self.config)

    def inference_generator(self) -> nn.Module:
        """The module that turns latents into images: the EMA generator for GANs, the VAE itself."""
        return self.modules["generator_ema"] if self.algorithm == "gan" else self.modules["vae"]

    def check_dataset(self, dataset, log=print) -> None:
        """Refuse a dataset whose images this model cannot take (shape, channels, classes); note
        one that is not the dataset it trained on (another content hash), which is allowed.

        Args:
            dataset: a `data.dataset.PreparedDataset`.

        Raises:
            DataError: the images or classes do not fit the model.
        """
        shape, classes = tuple(dataset.image_shape), dataset.num_classes
        conditional = bool(getattr(self.inference_generator(), "num_classes", 0))
        if shape != tuple(self.data.image_shape) or (conditional and classes != self.data.num_classes):
            raise DataError(f"{dataset.path} holds {classes}-class images of shape {shape}, but {self.path} was trained "
                            f"on {self.data.num_classes}-class images of shape {tuple(self.data.image_shape)}: give "
                            "the dataset it trained on (or one prepared like it)")
        if self.data.content_hash and dataset.content_hash != self.data.content_hash:
            log(f"note: {self.path} was trained on other data ({self.data.content_hash[:19]}...) than {dataset.path}")

    @property
    def latent_prior(self) -> nn.Module | None:
        """A VAE's fitted prior (`models.prior.GaussianMixturePrior`) that sampling draws latents
        from, or None: sample N(0, I) (GANs, and VAEs saved before priors were fitted)."""
        return self.modules.get(LATENT_PRIOR)


def save_checkpoint(
    path: str | Path,
    *,
    algorithm: str,
    experiment: dict,
    data: DataSpec,
    modules: dict[str, nn.Module],
    step: int,
    training_state: dict | None = None,
    metrics: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint folder atomically.

    Args:
        path: the folder to create.
        algorithm: 'gan' or 'vae'.
        experiment: the validated experiment config as a dict.
        data: the data spec the modules were built for.
        modules: plain (unwrapped) registered modules by name.
        step: optimisation steps completed.
        training_state: optimisers, RNG, data position (omitted for inference-only exports).
        metrics: latest metrics, recorded for lineage.
        overwrite: replace an existing folder.

    Returns:
        The folder path.
    """
    tensors = {}
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().to("cpu").contiguous()
    config = {
        "kind": CHECKPOINT_KIND,
        "format_version": FORMAT_VERSION,
        "latentforge_version": __version__,
        "algorithm": algorithm,
        "step": int(step),
        "experiment": experiment,
        "data": data.to_json(),
        "modules": {name: describe(m) for name, m in modules.items()},
        "metrics": metrics or {},
    }
    with staged_dir(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "latentforge_version": __version__})
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE)
        atomic_write_json(tmp / CONFIG, config)
    return Path(path)


def set_modules(path: str | Path, modules: dict[str, nn.Module]) -> Path:
    """Add or replace modules of an existing checkpoint in place (e.g. a VAE's fitted prior),
    keeping every other module's weights, the training state and the experiment config.

    Every file is written atomically, in an order where an interruption at any point leaves a
    checkpoint that loads: config.json first drops the modules being replaced (tensors a config
    does not name are ignored), then the weights file is rewritten, then config.json names the new
    modules. Stopped in between, the checkpoint loads without them.

    Raises:
        CheckpointError: `path` is not a readable checkpoint.
    """
    path = resolve_checkpoint(path)
    config = _read_config(path)
    try:
        tensors = load_file(str(path / WEIGHTS), device="cpu")
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path / WEIGHTS}: {e}") from e
    replaced = [name for name in modules if name in config["modules"]]
    if replaced:
        atomic_write_json(path / CONFIG, {**config, "modules": {k: v for k, v in config["modules"].items()
                                                                if k not in replaced}})
    for name, module in modules.items():
        tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{name}.")}
        tensors.update({f"{name}.{k}": v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()})
        config["modules"][name] = describe(module)
    atomic_write_bytes(path / WEIGHTS, save(tensors, metadata={"format": "pt", "latentforge_version": __version__}))
    atomic_write_json(path / CONFIG, config)
    return path


def _read_config(path: Path) -> dict:
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path} is not a checkpoint: it has no {CONFIG}")
    try:
        config = read_json(path / CONFIG)
    except Exception as e:
        raise CheckpointError(f"{path / CONFIG} is unreadable: {e}") from e
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind != CHECKPOINT_KIND:
        raise CheckpointError(f"{path / CONFIG} is not a LatentForge checkpoint (kind={kind!r})")
    version = config.get("format_version", -1)
    if not isinstance(version, int):
        raise CheckpointError(f"{path / CONFIG} is damaged: format_version is {version!r}, not a number")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this LatentForge "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade latentforge"
        )
    _check_structure(path, config)
    return config


# The modules a checkpoint must hold, the inference module last. A checkpoint training wrote holds
# them all (resume and `evaluate --no-ema` need the raw generator and D); an inference copy
# (`write_inference_copy`, what a registry stores) holds only what sampling and editing read.
REQUIRED_MODULES = {"gan": ("generator", "generator_ema"), "vae": ("vae",)}
INFERENCE_MODULES = {"gan": ("generator_ema",), "vae": ("vae", LATENT_PRIOR)}  # LATENT_PRIOR when fitted


def _is_inference_copy(config: dict) -> bool:
    return config.get("inference_only") is True


def _check_structure(path: Path, config: dict) -> None:
    """What loading relies on, checked before anything is built: the fields and their types, the
    modules the algorithm needs, and data that fits the inference module (a planted or hand-edited
    config.json is refused here, by name, rather than failing somewhere inside).

    Raises:
        CheckpointError: the first problem found.
    """
    def damaged(problem: str) -> CheckpointError:
        return CheckpointError(f"{path / CONFIG} is damaged: {problem}; restore the checkpoint from its run folder "
                               "or retrain")

    algorithm, step, modules = config.get("algorithm"), config.get("step"), config.get("modules")
    if algorithm not in REQUIRED_MODULES:
        raise damaged(f"algorithm is {algorithm!r}, not one of {sorted(REQUIRED_MODULES)}")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise damaged(f"step is {step!r}, not a count of steps")
    if not isinstance(config.get("experiment"), dict):
        raise damaged("it has no experiment config")
    if not (isinstance(modules, dict) and all(isinstance(m, dict) and isinstance(m.get("args", {}), dict)
                                              for m in modules.values())):
        raise damaged("modules is not a mapping of module names to {class, args}")
    required = REQUIRED_MODULES[algorithm][-1:] if _is_inference_copy(config) else REQUIRED_MODULES[algorithm]
    missing = [m for m in required if m not in modules]
    if missing:
        raise damaged(f"a {algorithm.upper()} checkpoint needs the modules {', '.join(missing)}")
    try:
        data = DataSpec.from_json(config["data"])
        c, h, w = (int(v) for v in data.image_shape)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise damaged(f"its data spec is unreadable ({type(e).__name__}: {e})") from e
    args = modules[REQUIRED_MODULES[algorithm][-1]].get("args", {})  # the inference module's
    channels, resolution, classes = args.get("channels", c), args.get("resolution", h), args.get("num_classes", 0)
    if (channels, resolution) != (c, h) or classes not in (0, data.num_classes):
        raise damaged(f"its data spec ({c}x{h}x{w} images, {data.num_classes} classes) does not fit its model "
                      f"({channels} channels at {resolution} px, {classes} classes)")


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders under a run folder (any depth ≤ 2), ordered by step."""
    run_dir = Path(run_dir)
    found = []
    for cfg in list(run_dir.glob(f"*/{CONFIG}")) + list(run_dir.glob(f"*/*/{CONFIG}")):
        folder = cfg.parent
        if folder.name.startswith("."):
            continue
        try:
            config = read_json(cfg)
            if config.get("kind") == CHECKPOINT_KIND:  # not a dataset's feature net or grader
                found.append((int(config.get("step", -1)), str(folder), folder))
        except Exception:
            continue  # an unreadable config is not a usable checkpoint; skip it
    return [f for _, _, f in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the latest checkpoint inside a run folder.

    Raises:
        CheckpointError: nothing usable at `path`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / CONFIG).is_file():
        return path
    if (path / "manifest.json").is_file():
        raise CheckpointError(f"{path} is a prepared dataset, not a checkpoint; give a checkpoint or run folder "
                              "(the dataset goes to --data)")
    best = sweep_best(path)
    if best is not None:
        return best["checkpoint"]
    found = find_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path} holds no checkpoint (no */{CONFIG}); give a checkpoint or run folder")
    own = [f for f in found if f.parent == path]  # a run folder's own checkpoints come before any nested run's
    runs = sorted({f.parent.name for f in found if f.parent != path})
    if not own and len(runs) > 1:  # e.g. a Tune experiment folder: the latest step is not the best trial
        shown = ", ".join(runs[:4]) + (f" and {len(runs) - 4} more" if len(runs) > 4 else "")
        raise CheckpointError(f"{path} holds the checkpoints of {len(runs)} runs ({shown}): give one of their folders")
    return (own or found)[-1]


SWEEP_FILE = "sweep.json"  # written by latentforge.tune.sweep at a sweep folder's top
SWEEP_SUMMARY = "summary.json"  # written when a sweep ends; "best" names the trial it ranked first


def _sweep_folder(path: Path) -> Path | None:
    """The sweep folder that `path` is, or whose Tune experiment folder (`tune/`) it is."""
    path = path.absolute()  # "." inside tune/ has a parent too
    for folder in (path, path.parent):
        if (folder / SWEEP_FILE).is_file() and (folder == path or path.name == "tune"):
            return folder
    return None


def sweep_best(path: str | Path) -> dict | None:
    """For a sweep folder (or its `tune/` folder): its summary's best trial (trial_id, metric,
    config, metrics, ...) with "checkpoint" as a local Path, and "sweep" / "sweep_dir" / "metric_name";
    None for any other folder. A sweep folder moved or copied elsewhere still finds its checkpoint
    (the summary records where the sweep ran).

    Raises:
        CheckpointError: a sweep whose best checkpoint is not known yet, or not on this machine.
    """
    sweep = _sweep_folder(Path(path))
    if sweep is None:
        return None
    summary_file = sweep / SWEEP_SUMMARY
    give = f"give one trial's checkpoint folder under {sweep / 'tune'}"
    try:
        summary = read_json(summary_file) if summary_file.is_file() else {}
        best = summary.get("best")
        recorded = str(best["checkpoint"]) if isinstance(best, dict) and best.get("checkpoint") else None
    except Exception as e:
        raise CheckpointError(f"{summary_file} is unreadable ({type(e).__name__}); {give}") from e
    if recorded is None:
        raise CheckpointError(f"sweep {sweep} has no best checkpoint yet ({SWEEP_SUMMARY} is written when the sweep "
                              f"ends, and names no trial with a finite metric); {give}, or resume the sweep with "
                              "`latentforge tune --resume`")
    if "://" in recorded:
        raise CheckpointError(f"sweep {sweep}'s best checkpoint is on remote storage ({recorded}); download it and "
                              "give its folder")
    ck = sweep / recorded  # an absolute path stays as it is
    if not (ck / CONFIG).is_file() and "tune" in ck.parts:  # the sweep folder was moved: its tune/... is here
        ck = sweep.joinpath(*ck.parts[len(ck.parts) - 1 - ck.parts[::-1].index("tune"):])
    if not (ck / CONFIG).is_file():
        raise CheckpointError(f"sweep {sweep}'s best checkpoint {recorded} is gone (deleted, or not copied with the "
                              f"sweep); {give}")
    return {**best, "checkpoint": ck, "sweep": summary.get("sweep"), "sweep_dir": str(sweep),
            "metric_name": summary.get("metric")}


def holds_checkpoint(path: str | Path) -> bool:
    """Whether `path` is meant as a checkpoint: a checkpoint, run or sweep folder (or a dataset given by
    mistake, which `resolve_checkpoint` explains). Anything else is for the caller to read otherwise."""
    path = Path(path)
    return path.is_dir() and ((path / CONFIG).is_file() or (path / "manifest.json").is_file()
                              or _sweep_folder(path) is not None or any(path.glob(f"*/{CONFIG}"))
                              or bool(find_checkpoints(path)))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint (or a run folder's latest) for inference.

    Raises:
        CheckpointError: missing files, unknown classes, or weights that do not match.
    """
    path = resolve_checkpoint(path)
    config = _read_config(path)
    _check_shapes_before_allocating(path, config)
    modules = {}
    for name, spec in config["modules"].items():
        try:
            modules[name] = build_module(spec)
        except CheckpointError as e:  # a plug-in that is not allowed or cannot be imported
            raise CheckpointError(f"{path}: module {name!r}: {e}") from e
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot build module {name!r} ({e})") from e
    _load_weights(path, modules)
    for name, m in modules.items():
        try:
            getattr(m, "check_loaded", lambda: None)()  # a module that can tell planted values
        except ValueError as e:
            raise CheckpointError(f"{path}: module {name!r}: {e}") from e
    modules = {name: m.to(device).eval().requires_grad_(False) for name, m in modules.items()}
    return LoadedCheckpoint(path=path, config=config, modules=modules, step=int(config["step"]),
                            algorithm=config["algorithm"], data=DataSpec.from_json(config["data"]))


def write_inference_copy(src: str | Path, dst: str | Path) -> Path:
    """Write `src`'s config.json and model.safetensors into the folder `dst`, keeping only the
    modules inference reads (`INFERENCE_MODULES`): a GAN's D and raw generator are half to three
    quarters of its weights, and a server would otherwise download and hold them for nothing. The copy
    loads with `load_checkpoint` (marked `inference_only`), samples the same bytes, and refuses to
    resume training or `evaluate --no-ema`. Files are written atomically.

    Raises:
        CheckpointError: `src` is not a loadable checkpoint.
    """
    from safetensors import safe_open

    src = resolve_checkpoint(src)
    config = _read_config(src)
    keep = [m for m in INFERENCE_MODULES[config["algorithm"]] if m in config["modules"]]
    try:
        with safe_open(str(src / WEIGHTS), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.split(".", 1)[0] in keep}
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {src / WEIGHTS}: {e}") from e
    slim = {**config, "modules": {m: config["modules"][m] for m in keep}, "inference_only": True}
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dst / WEIGHTS, save(tensors, metadata=metadata))
    atomic_write_json(dst / CONFIG, slim)
    return dst


def _check_shapes_before_allocating(path: Path, config: dict) -> None:
    """Build every module on the meta device (no memory) and compare its tensors with the shapes
    the weights file declares in its header: a config.json that does not describe the weights
    beside it (planted, or from another model) is refused before anything is allocated, so what is
    allocated is bounded by the file on disk."""
    for name, spec in config.get("modules", {}).items():
        check_weights_describe(spec, path / WEIGHTS, f"{name}.", f"{path}: {CONFIG} describes module {name!r}")


def check_weights_describe(spec: dict, weights: Path, prefix: str = "", what: str = "the config") -> None:
    """Refuse a module spec whose tensors differ from those a safetensors file declares under
    `prefix`, having built it on the meta device only (nothing allocated).

    Raises:
        CheckpointError: the file is unreadable, the spec cannot be built, or a shape differs.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {weights}: {e}") from e
    try:
        with torch.device("meta"):
            module = build_module(spec)
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: it cannot be built ({e})") from e
    except (NotImplementedError, RuntimeError):
        return  # a constructor that computes on its tensors: checked when the weights load
    for key, t in module.state_dict().items():
        found = shapes.get(f"{prefix}{key}", "missing")
        if found != tuple(t.shape):
            raise CheckpointError(f"{what} with {key} of shape {tuple(t.shape)}, but {weights.name} holds {found}: the "
                                  "config does not belong to these weights")


def load_training_state(path: str | Path) -> dict:
    """The optimiser/RNG/data-position state of a checkpoint (tensors and containers only).

    Raises:
        CheckpointError: the file is missing or holds anything but plain data.
    """
    f = Path(path) / TRAINING_STATE
    if not f.is_file():
        raise CheckpointError(f"{path} has no {TRAINING_STATE}: it is an inference-only export and cannot resume")
    import pickle

    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what torch raises for anything but tensors and plain data
        raise CheckpointError(f"refusing to load {f}: it is damaged, or holds objects other than tensors and plain "
                              f"data, which a checkpoint never does (weights_only=True): {e}") from e
    except Exception as e:
        raise CheckpointError(f"cannot read {f}: it is damaged or truncated ({type(e).__name__}: {e}); resume from "
                              "an earlier checkpoint (train --resume skips damaged ones) or retrain") from e


def load_module_weights(path: str | Path, modules: dict[str, nn.Module]) -> None:
    """Load a checkpoint's weights into existing (plain) modules, e.g. to resume training."""
    _load_weights(resolve_checkpoint(path), modules)


def _load_weights(path: Path, modules: dict[str, nn.Module]) -> None:
    """Fill each module from the `<name>.`-prefixed tensors of the checkpoint's safetensors file."""
    try:
        tensors = load_file(str(path / WEIGHTS), device="cpu")
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path / WEIGHTS}: {e}") from e
    for name, module in modules.items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights for {name!r} do not match its architecture: {e}") from e
