"""Typed, validated experiment configs and the named presets.

A config is YAML → dict → `GANExperiment` or `VAEExperiment` (pydantic, unknown keys rejected).
All problems are reported together, each naming its field. Configs never travel into nn.Modules:
`latentforge.builders` flattens them into constructor arguments.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from latentforge.errors import ConfigError

# Seeds are whole numbers in 0..2^63-1 everywhere: configs, CLI flags and API requests (serve.schemas).
# Derived seeds (an epoch's, a window's) wrap to the 64 bits torch.Generator takes (data.stream.wrap_seed).
MAX_SEED = 2**63 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]  # the type of every seed field


class StrictConfig(BaseModel):
    """Base of every config model (experiments, sweeps, job specs, serving): unknown keys are errors
    and a validated config is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_arch(cfg, algorithm: str, option_fields: dict[str, str]):
    """`model.arch` names a registered family of this algorithm (or a plug-in reference, whose
    constructor checks its own options at build time); each `*_options` mapping fits its role."""
    from latentforge.models.architectures import get_family
    from latentforge.models.plugins import is_plugin_ref

    if is_plugin_ref(cfg.arch):
        return cfg
    fam = get_family(cfg.arch, algorithm)  # ValueError lists the valid names
    for fld, role in option_fields.items():
        given = getattr(cfg, fld)
        schema = fam.options.get(role)
        if schema is None:
            if given:
                raise ValueError(f"{fld}: the {cfg.arch!r} family takes no {role} options (got {sorted(given)})")
            continue
        try:
            valid = schema.model_validate(given)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise ValueError(f"{fld} for the {cfg.arch!r} family: {problems}") from None
        # keep the validated values ('false' → False, 2.0 → 2), only the keys given
        object.__setattr__(cfg, fld, valid.model_dump(exclude_unset=True))
    return cfg


class GANModelConfig(StrictConfig):
    arch: str = "dcgan"  # generator/discriminator family: dcgan | resnet (models.architectures), or a plug-in package.module:Generator
    z_dim: int = Field(64, ge=1, le=1024)  # latent size
    g_width: int = Field(32, ge=4, le=512)  # generator channels at full resolution (x2 per halving, up to x8)
    d_width: int = Field(32, ge=4, le=512)  # discriminator channels at full resolution
    g_norm: Literal["batch", "layer", "none"] = "batch"  # batch: BatchNorm; layer/none are batch-independent (exact data parallelism)
    d_norm: Literal["spectral", "layer", "instance", "none"] = "spectral"  # no BatchNorm in D by design
    conditional: bool = False  # class-conditional G (label embedding) and projection D
    embed_dim: int = Field(32, ge=1, le=1024)  # label embedding size in G (conditional only)
    g_options: dict[str, Any] = {}  # family-specific generator keywords (resnet: blocks_per_stage, attention_res, spectral_norm)
    d_options: dict[str, Any] = {}  # family-specific discriminator keywords (resnet: extra_blocks, attention_res)

    @model_validator(mode="after")
    def _arch(self):
        return _check_arch(self, "gan", {"g_options": "generator", "d_options": "discriminator"})


class VAEModelConfig(StrictConfig):
    arch: str = "conv_vae"  # VAE family: conv_vae | resnet_vae (models.architectures), or a plug-in package.module:VAE
    z_dim: int = Field(16, ge=1, le=1024)  # latent size
    width: int = Field(32, ge=4, le=512)  # encoder/decoder channels at full resolution
    conditional: bool = False  # class-conditional encoder and decoder
    embed_dim: int = Field(16, ge=1, le=1024)  # label embedding size (conditional only)
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"  # decoder likelihood p(x|z)
    options: dict[str, Any] = {}  # family-specific keywords (resnet_vae: learn_sigma, blocks_per_stage)

    @model_validator(mode="after")
    def _arch(self):
        return _check_arch(self, "vae", {"options": "vae"})


class GANConfig(StrictConfig):
    loss: Literal["ns", "hinge", "wgan-gp"] = "ns"  # non-saturating, hinge, or Wasserstein + gradient penalty
    lr_g: float = Field(2e-4, gt=0, le=10)  # generator learning rate (TTUR: may differ from lr_d)
    lr_d: float = Field(2e-4, gt=0, le=10)  # discriminator learning rate
    beta1: float = Field(0.5, ge=0, lt=1)  # Adam beta1 (0.5 or 0 is usual for GANs)
    beta2: float = Field(0.999, ge=0, lt=1)  # Adam beta2
    n_critic: int = Field(1, ge=1, le=20)  # discriminator updates per generator update
    gp_weight: float = Field(10.0, ge=0)  # gradient-penalty weight (wgan-gp only)
    r1_weight: float = Field(0.0, ge=0)  # R1 penalty gamma on real data (0 = off)
    r1_interval: int = Field(1, ge=1, le=64)  # lazy R1 (StyleGAN2): the penalty every k D updates, weighted by k. Unlike stylegan2-ada-pytorch, Adam's lr and betas are not rescaled by k/(k+1): lr_d is the lr used (the reference's 0.0025 at k=16 is 0.00235 here)
    augment: Literal["none", "diffaugment", "ada"] = "none"  # augment D's inputs (reals and fakes alike): for small data
    diffaugment_policy: list[Literal["color", "translation", "cutout"]] = ["color", "translation", "cutout"]  # DiffAugment ops
    ada_target: float = Field(0.6, gt=0, lt=1)  # ADA: wanted E[sign(D(real))]; above it p grows
    ada_interval: int = Field(4, ge=1)  # ADA: D updates between adjustments of p
    ada_kimg: float = Field(100.0, gt=0)  # ADA: thousands of images for p to move from 0 to 1 (paper: 500)
    ada_p_init: float = Field(0.0, ge=0, le=1)  # ADA: p at the start of a run
    pl_weight: float = Field(0.0, ge=0)  # path-length regulariser (StyleGAN2: 2); needs a generator with W (stylegan2)
    pl_interval: int = Field(4, ge=1, le=64)  # lazy: the regulariser every k G updates, weighted by k
    pl_decay: float = Field(0.01, gt=0, le=1)  # EMA rate of the running mean path length
    ema_decay: float = Field(0.999, ge=0, lt=1)  # EMA of generator weights (ramped up early in training)
    grad_clip: float | None = Field(None, gt=0)  # clip each network's gradient norm (None = off)


class VAEConfig(StrictConfig):
    lr: float = Field(1e-3, gt=0, le=10)  # Adam learning rate
    beta1: float = Field(0.9, ge=0, lt=1)  # Adam beta1
    beta2: float = Field(0.999, ge=0, lt=1)  # Adam beta2
    beta: float = Field(1.0, gt=0)  # KL weight; > 1 gives a beta-VAE
    kl_warmup_steps: int = Field(0, ge=0)  # linear KL annealing from 0 to beta over this many steps
    decoder_sigma: float = Field(0.1, gt=0)  # fixed std of the Gaussian likelihood, in [-1, 1] pixel units
    grad_clip: float | None = Field(None, gt=0)  # clip the gradient norm (None = off)
    prior: Literal["gmm", "standard"] = "gmm"  # what sampling draws latents from: gmm, a Gaussian mixture fitted to training images' posterior means at every checkpoint (Ghosh et al. 2020); standard, N(0, I)
    prior_components: int = Field(10, ge=1, le=256)  # the mixture's components (full covariance)
    prior_images: int = Field(10000, ge=10, le=1_000_000)  # training images encoded for the fit (at most 512 MB of pixels)


class TrainConfig(StrictConfig):
    steps: int = Field(2000, ge=1)  # optimisation steps (a GAN step = n_critic D updates + 1 G update)
    global_batch_size: int = Field(64, ge=1, le=65536)  # images per step over all workers
    per_worker_batch_size: int | None = Field(None, ge=1)  # derived: global / workers (set to assert it)
    accumulate: int = Field(1, ge=1, le=256)  # micro-batches per worker batch (gradient accumulation; DDP syncs once)
    seed: Seed = 0  # seeds weights, noise and data order
    shuffle_window_mb: int = Field(256, ge=1)  # stream loader: MB of pixels shuffled together; a worker holds about three
    log_every: int = Field(25, ge=1)  # steps between console/JSON-lines log records
    sample_every: int = Field(250, ge=1)  # steps between sample grids
    checkpoint_every: int = Field(500, ge=1)  # steps between checkpoints
    num_to_keep: int = Field(3, ge=1)  # checkpoints kept (oldest deleted)
    sample_count: int = Field(64, ge=1, le=1024)  # images in a sample grid
    eval_every: int = Field(0, ge=0)  # steps between evaluations (FID, recall, ...) on the chief; 0 = off
    eval_samples: int = Field(1000, ge=10, le=50000)  # generated images per periodic evaluation
    threads: int | None = Field(None, ge=1)  # torch threads per worker (None = CPU cores / workers)
    tracking: Literal["wandb", "none"] = "wandb"  # wandb on the chief worker (offline unless WANDB_MODE=online)
    sync_batchnorm: bool = False  # GPU only: SyncBatchNorm in G so batch statistics span all workers
    precision: Literal["fp32", "bf16", "auto"] = "fp32"  # bf16: forward passes under autocast (no loss scaler); losses, penalties, EMA, optimiser state stay fp32. auto: bf16 where the device runs it natively, else fp32 (checkpoints record the one used)
    channels_last: bool | Literal["auto"] = "auto"  # NHWC memory layout for conv weights and batches. auto: on for CPUs (faster there in fp32 and bf16: docs/performance.md) and for bf16 on CUDA, off for fp32 on CUDA (checkpoints record the one used)
    tf32: bool = False  # CUDA only: TF32 matmuls/convs; off by default, as NVIDIA keeps it for GANs
    compile: bool = False  # torch.compile the plain forward passes (D stays eager when a gradient penalty needs double backward)

    @field_validator("channels_last", mode="before")
    @classmethod
    def _layout(cls, v):
        if v == "auto" or isinstance(v, bool):
            return v
        try:  # true/false/yes/no/1/0, as for any boolean field
            return TypeAdapter(bool).validate_python(v)
        except ValidationError:
            raise ValueError("must be true, false or auto") from None


class GANExperiment(StrictConfig):
    name: str  # preset or run name
    description: str = ""  # one line shown in listings
    algorithm: Literal["gan"]
    model: GANModelConfig = GANModelConfig()
    gan: GANConfig = GANConfig()
    train: TrainConfig = TrainConfig()


class VAEExperiment(StrictConfig):
    name: str
    description: str = ""
    algorithm: Literal["vae"]
    model: VAEModelConfig = VAEModelConfig()
    vae: VAEConfig = VAEConfig()
    train: TrainConfig = TrainConfig()


Experiment = Annotated[Union[GANExperiment, VAEExperiment], Field(discriminator="algorithm")]
_ADAPTER = TypeAdapter(Experiment)


# Ways the training split reaches the workers (`--data-loader`):
# stream: exact seeded epochs streamed from Parquet row groups (data/stream.py), the default;
# memory: the whole split in each worker's memory (the same batches as stream for small data);
# ray: Ray Data shards (decoding in Ray Data tasks; a local shuffle buffer, so not exact).
DATA_LOADERS = ("stream", "memory", "ray")

# Named precision/layout modes: config overrides that benchmarks, the demo and tests share.
PRECISION_MODES: dict[str, dict[str, Any]] = {
    "fp32": {"train.precision": "fp32", "train.channels_last": False},  # NCHW: the reference every speed-up is measured against
    "fp32+channels_last": {"train.precision": "fp32", "train.channels_last": True},
    "bf16": {"train.precision": "bf16", "train.channels_last": False},
    "bf16+channels_last": {"train.precision": "bf16", "train.channels_last": True},
    "bf16+channels_last+compile": {"train.precision": "bf16", "train.channels_last": True, "train.compile": True},
}


def format_validation_error(err: ValidationError, source: str, what: str = "config", tagged: bool = False) -> str:
    """One line per problem, each naming the field, what was wrong and the value given.

    Args:
        tagged: the errors come from the experiment union, whose locations start with the
            algorithm tag ('gan' / 'vae'), which is not part of the field's path.
    """
    lines = [f"invalid {what} {source}: {err.error_count()} problem(s)"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if tagged and loc and loc[0] in ("gan", "vae"):
            loc = loc[1:]
        field = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key; remove it or check its spelling")
        elif e["type"] == "missing":
            lines.append(f"  {field}: required; add it")
        elif e["type"] == "union_tag_invalid" or e["type"] == "union_tag_not_found":
            lines.append(f"  algorithm: must be 'gan' or 'vae' (got {e.get('input', {}).get('algorithm') if isinstance(e.get('input'), dict) else e.get('input')!r})")
        else:
            msg = e["msg"].removeprefix("Value error, ")  # a validator's own words
            # a model-level validator's input is a whole section (a serve config's API key among it):
            # its message names what is wrong, and the section is not echoed into logs
            secret = any(w in field.lower() for w in ("key", "token", "secret", "password"))  # never into a log
            got = "" if isinstance(e.get("input"), dict) or secret else f" (got {e.get('input')!r})"
            lines.append(f"  {field}: {msg}{got}")
    return "\n".join(lines)


def load_yaml_model(path: str | Path, model: type[BaseModel], what: str,
                    select: Callable[[dict, str], tuple[dict, str]] | None = None) -> BaseModel:
    """Read a YAML file into a pydantic model (job specs, sweeps).

    `select(data, source)` may pick the part of the file that holds the fields (and name it for
    the messages), e.g. a Ray Serve deployment file's application `args`.

    Raises:
        ConfigError: a missing or unreadable file, or every invalid field, each named.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}; check its permissions and that it is UTF-8 text") from e
    data = _read_yaml(text, str(p)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of fields at the top level, got {type(data).__name__}")
    source = str(p)
    if select is not None:
        data, source = select(data, source)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, what)) from e


def parse_experiment(data: Any, source: str = "<dict>") -> GANExperiment | VAEExperiment:
    """Validate a config mapping.

    Raises:
        ConfigError: listing every invalid field.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping at the top level, got {type(data).__name__}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, tagged=True)) from e


def preset_names() -> list[str]:
    """Names of the presets shipped in the package."""
    return sorted(p.name[:-5] for p in resources.files("latentforge.presets").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from e


def parse_override(item: str) -> tuple[str, Any]:
    """'gan.lr_g=1e-3' → ('gan.lr_g', 0.001); values are parsed as YAML scalars.

    Raises:
        ConfigError: the item has no '='.
    """
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. gan.lr_g=1e-3")
    parsed = _read_yaml(value, f"override {item!r}")
    if isinstance(parsed, str):
        try:  # YAML 1.1 reads '1e-3' (no dot) as a string; users mean a number
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Return a copy of `data` with dotted keys set (sections are created when missing). A mapping
    set on a section is merged into it: `gan: {lr_d: 1e-4}` changes lr_d and keeps the preset's
    loss and betas, where assigning it would silently reset them to the defaults. Only the
    section's own fields are merged: a mapping set on a field (`model.d_options: {}`) replaces it."""
    import copy

    out = copy.deepcopy(data)
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: {p!r} holds the value {nxt!r}, not a section of fields; set "
                                  f"its fields ({p}.FIELD=VALUE), not {p} itself")
            node = nxt
        last = parts[-1]
        is_section = node is out  # a top-level key: model, gan, vae, train, ...
        node[last] = {**node[last], **copy.deepcopy(value)} if is_section and isinstance(value, dict) and isinstance(
            node.get(last), dict) else value
    return out


def load_experiment_dict(preset_or_path: str) -> tuple[dict, str]:
    """Read a preset name or YAML path into a raw dict (not yet validated)."""
    path = Path(preset_or_path)
    if preset_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {preset_or_path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}; check its permissions and that it is UTF-8 "
                              "YAML") from e
        data = _read_yaml(text, str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections at the top level (name:, "
                              f"algorithm:, model:, ...), got a {type(data).__name__}")
        return data, str(path)
    names = preset_names()
    if preset_or_path not in names:
        raise ConfigError(f"unknown preset {preset_or_path!r}; choose one of: {', '.join(names)}, or give a YAML file path")
    text = resources.files("latentforge.presets").joinpath(f"{preset_or_path}.yaml").read_text(encoding="utf-8")
    return _read_yaml(text, f"preset {preset_or_path}") or {}, f"preset {preset_or_path}"


def load_experiment(preset_or_path: str, overrides: dict[str, Any] | None = None) -> GANExperiment | VAEExperiment:
    """Load, override and validate a preset or YAML file: the user's own config, so a plug-in
    architecture it names is allowed in this process (`allow_own_plugin`).

    Raises:
        ConfigError: unknown preset, unreadable YAML, or invalid fields (all listed).
    """
    data, source = load_experiment_dict(preset_or_path)
    return allow_own_plugin(parse_experiment(apply_overrides(data, overrides or {}), source))


def allow_own_plugin(cfg):
    """Allow the plug-in module a config the user gave names (naming it is the allowance). Configs
    read back from storage (a run's run.json, a checkpoint's config.json) do not come through
    here: their plug-ins need --allow-plugin or LATENTFORGE_PLUGINS."""
    from latentforge.models.plugins import allow_plugins, is_plugin_ref, split_ref

    if is_plugin_ref(cfg.model.arch):
        allow_plugins([split_ref(cfg.model.arch)[0]])
    return cfg


def experiment_to_dict(cfg: GANExperiment | VAEExperiment) -> dict:
    """Plain JSON-able dict (round-trips through `parse_experiment`)."""
    return cfg.model_dump(mode="json")
