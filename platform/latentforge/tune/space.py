"""Sweep configs: a validated YAML that names a base preset, a search space over any config
field, the schedule and the instability thresholds."""

from __future__ import annotations

import re

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from latentforge.errors import ConfigError
from latentforge.config import (
    DATA_LOADERS,
    Seed,
    StrictConfig,
    allow_own_plugin,
    apply_overrides,
    load_experiment_dict,
    load_yaml_model,
    parse_experiment,
)
from latentforge.metrics.registry import (
    CONDITIONAL_MODEL_METRICS,
    LABELLED_DATA_METRICS,
    REPORTED_METRICS,
    VAE_ONLY_METRICS,
)
from latentforge.tune.instability import InstabilityThresholds

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")
FAMILY_SEP = "::"  # Tune parameter names of family sub-spaces: '<arch>::<dotted key>'


class SchedulerConfig(StrictConfig):
    kind: Literal["asha", "pbt", "fifo"] = "asha"  # asha: successive halving; pbt: population based; fifo: none
    grace_period: int = Field(100, ge=1)  # ASHA: steps every trial gets before it can be cut
    reduction_factor: int = Field(3, ge=2)  # ASHA: keep 1/reduction_factor at each rung
    recheck_rungs: bool = True  # ASHA: re-apply a rung's cut as later trials reach it (tune/rungs.py)
    perturbation_interval: int = Field(100, ge=1)  # PBT: steps between exploit/explore decisions
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)  # PBT: bottom share that copies the top share
    resample_probability: float = Field(0.25, ge=0, le=1)  # PBT: chance to resample instead of perturb


class SearchConfig(StrictConfig):
    algorithm: Literal["random", "optuna"] = "random"  # optuna needs `pip install optuna`
    seed: Seed = 0  # seeds the sampled configurations: the same seed gives the same trials


class SweepConfig(StrictConfig):
    name: str  # sweep name (folder name prefix)
    base: str  # preset name or YAML path every trial starts from
    overrides: dict[str, Any] = {}  # fixed overrides of the base (dotted keys)
    space: dict[str, Any] = {}  # dotted key -> constant or {choice|uniform|loguniform|randint|grid: [...]}
    families: dict[str, dict[str, Any]] = {}  # model.arch -> its own sub-space (same syntax); a trial picks one family
    trials: int = Field(8, ge=1, le=10000)  # sampled configurations (grid: repeats of the grid)
    workers_per_trial: int = Field(1, ge=1)  # Ray Train workers per trial
    gpus: bool = False  # each of a trial's Ray Train workers holds one GPU (NCCL), as `train --gpus`
    max_concurrent: int = Field(2, ge=1)  # trials running at once
    steps: int = Field(600, ge=1)  # steps per trial when nothing stops it
    eval_every: int = Field(100, ge=1)  # steps between evaluations (and Tune checkpoints)
    eval_samples: int = Field(500, ge=10)  # generated images per evaluation
    report_every: int = Field(25, ge=1)  # steps between reports (losses, gradient norms) to the stopper
    metric: str = "fid"  # metric to optimise: one of metrics.registry.REPORTED_METRICS (fid, kid, recall, val_neg_elbo, ...)
    mode: Literal["min", "max"] = "min"
    data_loader: Literal[DATA_LOADERS] = "memory"  # config.DATA_LOADERS; memory: each worker holds the small split
    scheduler: SchedulerConfig = SchedulerConfig()
    search: SearchConfig = SearchConfig()
    stopper: InstabilityThresholds = InstabilityThresholds()
    promote_as: str | None = None  # registry name for the best trial (None: the sweep name)

    @field_validator("metric")
    @classmethod
    def _check_metric(cls, metric: str) -> str:
        if metric not in REPORTED_METRICS:
            bare = next((m for m in sorted(REPORTED_METRICS, key=len, reverse=True)
                         if re.fullmatch(rf"{m}\d+k?_(train|val)_[a-z0-9]+", metric)), None)
            if bare is not None:  # an `evaluate` key: a sweep's protocol is its own eval_samples, training split
                raise ValueError(f"unknown metric {metric!r}: sweeps optimise the bare name ({bare!r}); its protocol is "
                                 "eval_samples samples against the training split in the dataset's feature network")
            raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(REPORTED_METRICS)}")
        return metric

    @model_validator(mode="after")
    def _check_mode(self):
        better = REPORTED_METRICS[self.metric]
        if self.mode != better:
            raise ValueError(f"mode {self.mode!r} optimises {self.metric} the wrong way: lower is "
                             f"{'better' if better == 'min' else 'worse'}; set mode: {better}")
        return self

    @field_validator("space")
    @classmethod
    def _check_space(cls, space: dict) -> dict:
        _check_subspace("space", space)
        return space

    @model_validator(mode="after")
    def _check_sweep_owned_fields(self):
        """The sweep sets these training fields for every trial (experiment_for): set in overrides or
        space, they were silently replaced."""
        for where, keys in (("overrides", _dotted(self.overrides)), ("space", list(self.space)),
                            *((f"families.{a}", list(sub)) for a, sub in self.families.items())):
            for key in keys:
                if key in SWEEP_OWNED:
                    raise ValueError(f"{where}.{key}: the sweep sets it for every trial; {SWEEP_OWNED[key]}")
        return self

    @model_validator(mode="after")
    def _check_search(self):
        for arch, sub in self.families.items():  # checked here first: the batch check below reads them
            if isinstance(sub, dict):
                _check_subspace(f"families.{arch}", sub)
        spaces = [self.space, *(sub for sub in self.families.values() if isinstance(sub, dict))]
        if self.scheduler.kind == "pbt" and self.search.algorithm == "optuna":
            raise ValueError("scheduler pbt cannot take search.algorithm optuna (Tune refuses a search algorithm "
                             "beside PBT, which mutates the trials itself); use search.algorithm random")
        if self.scheduler.kind == "pbt":
            model_keys = [k for k in self.space if k.startswith("model.")]
            if model_keys:
                raise ValueError(f"space.{model_keys[0]}: scheduler pbt cannot search model fields: a trial that "
                                 "exploits another loads its weights, which another model setting gives other "
                                 "shapes; search model fields with asha or fifo, or fix them in overrides")
        if self.search.algorithm == "optuna" and any(isinstance(v, dict) and "grid" in v for sp in spaces for v in sp.values()):
            raise ValueError("search.algorithm optuna cannot take a grid dimension (Tune's Optuna search refuses it); "
                             "use choice, or search.algorithm random")
        if self.workers_per_trial > 1:
            for sp in spaces:
                spec = sp.get("train.global_batch_size")
                if isinstance(spec, dict) and next(iter(spec)) in ("uniform", "loguniform", "randint"):
                    raise ValueError(f"space.train.global_batch_size: with workers_per_trial {self.workers_per_trial} the "
                                     "batch must split evenly across workers; give a choice of multiples of "
                                     f"{self.workers_per_trial}")
                values = _corners(spec) if spec is not None else []
                bad = [v for v in values if isinstance(v, int) and v % self.workers_per_trial]
                if bad:
                    raise ValueError(f"space.train.global_batch_size: {bad[0]} does not split across "
                                     f"workers_per_trial {self.workers_per_trial}; give multiples of it")
        return self

    @model_validator(mode="after")
    def _check_families(self):
        if not self.families:
            if not self.space:
                raise ValueError("give a search space: space (dotted keys) and/or families (model.arch -> sub-space)")
            return self
        if "model.arch" in self.space:
            raise ValueError("with families, the family names choose model.arch: remove model.arch from space")
        if self.scheduler.kind == "pbt":
            raise ValueError("scheduler pbt cannot search families: a trial that exploits another would change its "
                             "architecture and load weights of another shape; use asha or fifo")
        for arch, subspace in self.families.items():
            if not isinstance(subspace, dict):
                raise ValueError(f"families.{arch}: give a mapping of dotted keys to values or distributions")
            _check_subspace(f"families.{arch}", subspace)
            grids = [k for k, spec in subspace.items() if isinstance(spec, dict) and "grid" in spec]
            if grids:
                raise ValueError(f"families.{arch}.{grids[0]}: grid would multiply every family's trials; use choice")
        return self


# training fields a sweep sets for every trial, and the sweep field to use instead
SWEEP_OWNED = {
    "train.steps": "use the sweep's steps", "train.eval_every": "use the sweep's eval_every",
    "train.eval_samples": "use the sweep's eval_samples",
    "train.checkpoint_every": "a trial checkpoints at each evaluation (the sweep's eval_every)",
    "train.sample_every": "a trial samples at each evaluation (the sweep's eval_every)",
    "train.log_every": "use the sweep's report_every", "train.tracking": "trials report to Tune, not to a tracker",
}


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    """The dotted keys a (possibly nested) overrides mapping sets."""
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.extend(_dotted(v, f"{key}.") if isinstance(v, dict) else [key])
    return out


def _check_subspace(where: str, space: dict) -> None:
    for key, spec in space.items():
        if FAMILY_SEP in key:
            raise ValueError(f"{where}.{key}: '{FAMILY_SEP}' is reserved in keys")
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"{where}.{key}: give one of {', '.join(DISTRIBUTIONS)} (got {list(spec)})")
            kind, args = next(iter(spec.items()))
            if not isinstance(args, list) or not args:
                raise ValueError(f"{where}.{key}.{kind}: needs a non-empty list")
            if kind in ("uniform", "loguniform", "randint"):
                if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                    raise ValueError(f"{where}.{key}.{kind}: needs [low, high], two numbers (got {args})")
                if kind == "randint" and not all(float(a).is_integer() for a in args):
                    raise ValueError(f"{where}.{key}.randint: needs whole numbers (got {args})")
                if not args[0] < args[1]:
                    raise ValueError(f"{where}.{key}.{kind}: needs low < high (got {args})")
            if kind == "loguniform" and not 0 < float(args[0]) < float(args[1]):
                raise ValueError(f"{where}.{key}.loguniform: needs 0 < low < high (got {args})")


def trial_params(sweep: "SweepConfig", params: dict) -> dict:
    """The overrides a trial's sampled parameters stand for: the shared ones, plus, with families,
    `model.arch` and the chosen family's own (the other families' samples are ignored)."""
    if not sweep.families:
        return dict(params)
    arch = params["model.arch"]
    out = {k: v for k, v in params.items() if FAMILY_SEP not in k}
    prefix = f"{arch}{FAMILY_SEP}"
    out.update({k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)})
    return out


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep YAML, and check that every point of the space makes a valid
    experiment (a typo in a dotted key fails here, not after an hour of trials).

    Raises:
        ConfigError: every problem, each naming its field.
    """
    sweep = load_yaml_model(path, SweepConfig, "sweep")
    sweep = sweep.model_copy(update={"base": _absolute_base(sweep.base, Path(path))})
    if sweep.search.algorithm == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:  # before a sweep folder is written
            raise ConfigError("search.algorithm optuna needs optuna: pip install optuna")
    check_space(sweep)
    return sweep


def _absolute_base(base: str, sweep_file: Path) -> str:
    """A YAML `base` as an absolute path: Tune runs each trial in its own working folder, where a
    relative path no longer points at the file. Relative to the current folder, else to the
    sweep file's folder; a preset name is kept."""
    if not base.endswith((".yaml", ".yml")) and not Path(base).is_file():
        return base
    for candidate in (Path(base), sweep_file.parent / base):
        if candidate.is_file():
            return str(candidate.resolve())
    return base  # check_space names the missing file


def _corners(spec) -> list:
    if not isinstance(spec, dict):
        return [spec]
    kind, args = next(iter(spec.items()))
    return list(args) if kind in ("choice", "grid") else [args[0], args[1]]


def check_space(sweep: SweepConfig) -> None:
    """Build the experiment at the corners of every dimension of the space, and check that the
    metric is one this kind of model reports."""
    base, source = load_experiment_dict(sweep.base)
    base = apply_overrides(base, sweep.overrides)
    cfg = parse_experiment(base, source)
    algorithm = cfg.algorithm
    if sweep.metric in CONDITIONAL_MODEL_METRICS and not cfg.model.conditional:
        raise ConfigError(f"sweep metric {sweep.metric!r} is reported by class-conditional models only and "
                          f"{sweep.base} is not conditional; choose another metric or set model.conditional")
    if sweep.metric in VAE_ONLY_METRICS and algorithm != "vae":
        raise ConfigError(f"sweep metric {sweep.metric!r} is reported by VAEs only and {sweep.base} is a "
                          f"{algorithm}; choose one of: {', '.join(m for m in REPORTED_METRICS if m not in VAE_ONLY_METRICS)}")
    for key, spec in sweep.space.items():
        _check_dimension(base, source, key, spec, "the sweep space")
    for arch, subspace in sweep.families.items():
        family_base = apply_overrides(base, {"model.arch": arch})
        parse_experiment(family_base, f"{source} with model.arch={arch!r} from the sweep families")
        for key, spec in subspace.items():
            _check_dimension(family_base, f"{source} with model.arch={arch!r}", key, spec, "the sweep families")


def _check_dimension(base: dict, source: str, key: str, spec, where: str) -> None:
    """Every corner of one dimension makes a valid experiment, and a continuous distribution is
    only put on a field that takes fractions (a sampled 45.27 for model.z_dim failed in the trial)."""
    for value in _corners(spec):
        parse_experiment(apply_overrides(base, {key: value}), f"{source} with {key}={value!r} from {where}")
    if isinstance(spec, dict) and next(iter(spec)) in ("uniform", "loguniform"):
        kind, (low, high) = next(iter(spec.items()))
        between = low + 0.37 * (high - low)  # a value between the corners with a fraction
        try:
            parse_experiment(apply_overrides(base, {key: between}), f"{source} with {key}={between!r} from {where}")
        except ConfigError as e:
            raise ConfigError(f"{key}: {kind} samples fractions and this field takes whole numbers ({e}); "
                              "use randint: [low, high] or choice") from None


def check_metric_for_data(sweep: SweepConfig, data_dir) -> None:
    """Refuse, before any trial, a metric the dataset cannot produce (class metrics need labels)."""
    from latentforge.data.dataset import PreparedDataset

    ds = PreparedDataset(data_dir)
    if sweep.metric in VAE_ONLY_METRICS and ds.manifest["splits"]["val"]["count"] == 0:
        raise ConfigError(f"sweep metric {sweep.metric!r} is measured on the validation split and {data_dir} has none "
                          "(prepared with --val-fraction 0); prepare it with a validation split, or choose fid")
    if sweep.metric in LABELLED_DATA_METRICS and ds.num_classes == 0:
        raise ConfigError(f"sweep metric {sweep.metric!r} needs class labels and {data_dir} has none; "
                          f"choose one of: fid, kid, precision, recall, density, coverage")


def experiment_for(sweep: SweepConfig, params: dict) -> Any:
    """The experiment config of one trial: base + fixed overrides + sampled parameters."""
    base, source = load_experiment_dict(sweep.base)
    data = apply_overrides(apply_overrides(base, sweep.overrides), trial_params(sweep, params))
    data = apply_overrides(data, {"train.steps": sweep.steps, "train.eval_every": sweep.eval_every,
                                  "train.eval_samples": sweep.eval_samples, "train.checkpoint_every": sweep.eval_every,
                                  "train.log_every": sweep.report_every, "train.tracking": "none",
                                  "train.sample_every": sweep.eval_every})
    return allow_own_plugin(parse_experiment(data, f"{source} (sweep trial)"))  # the sweep file is the user's


def distinct_points(sweep: SweepConfig) -> list[dict] | None:
    """Random search over a finite space (only `choice` lists and constants) without replacement.

    Tune's random search draws each trial independently, so in a 32-point space 8 trials hold a
    repeated configuration about 60% of the time; each repeat costs a whole trial and teaches
    nothing new. Here the product of the choices is shuffled with the sweep's seed and the first
    `trials` points are taken (the shuffle is repeated only when `trials` exceeds the space).

    Returns:
        One dict per trial, or None when some dimension is continuous (`uniform`, `loguniform`,
        `randint`), is a `grid` (enumerated by Tune), or Optuna chooses the points.
    """
    import itertools
    import random

    if sweep.search.algorithm != "random":
        return None

    def choices(space: dict, prefix: str = "") -> tuple[list[str], list[list]] | None:
        """Keys and their values (a constant is a single value); None when a dimension is not finite."""
        keys, values = [], []
        for key, spec in space.items():
            if isinstance(spec, dict):
                kind, args = next(iter(spec.items()))
                if kind != "choice":
                    return None
            keys.append(prefix + key)
            values.append(list(args) if isinstance(spec, dict) else [spec])
        return keys, values

    shared = choices(sweep.space)
    if shared is None:
        return None
    if sweep.families:  # the union over families of each one's product; other families' keys get their first value
        subs = {arch: choices(space, f"{arch}{FAMILY_SEP}") for arch, space in sweep.families.items()}
        if any(s is None for s in subs.values()):
            return None
        filler = {k: v[0] for keys, vals in subs.values() for k, v in zip(keys, vals)}
        per_family = {arch: [{**filler, **dict(zip(shared[0] + keys, combo)), "model.arch": arch}
                             for combo in itertools.product(*shared[1], *vals)]
                      for arch, (keys, vals) in subs.items()}
        return _round_robin(per_family, sweep.trials, random.Random(sweep.search.seed))
    else:
        if not any(isinstance(spec, dict) for spec in sweep.space.values()):
            return None
        product = [dict(zip(shared[0], combo)) for combo in itertools.product(*shared[1])]
    rng = random.Random(sweep.search.seed)
    points: list[dict] = []
    while len(points) < sweep.trials:
        rng.shuffle(product)
        points += product[: sweep.trials - len(points)]
    return points


def _round_robin(per_family: dict[str, list[dict]], trials: int, rng) -> list[dict]:
    """Trials spread evenly over families (in a seeded order), each family's points shuffled and
    taken without replacement: a family with a larger sub-space does not crowd out the others (a
    shuffle of the union gave 7 of 8 trials to the family with the most points)."""
    order = list(per_family)
    rng.shuffle(order)
    pools = {arch: [] for arch in order}
    points: list[dict] = []
    while len(points) < trials:
        for arch in order:
            if len(points) == trials:
                break
            if not pools[arch]:
                pools[arch] = list(per_family[arch])
                rng.shuffle(pools[arch])
            points.append(pools[arch].pop())
    return points


def tune_param_space(sweep: SweepConfig) -> dict:
    """The Ray Tune search space (dotted keys kept as flat keys)."""
    from ray import tune

    out = {}
    entries = list(sweep.space.items())
    if sweep.families:
        out["model.arch"] = tune.choice(list(sweep.families))
        entries += [(f"{arch}{FAMILY_SEP}{key}", spec) for arch, space in sweep.families.items() for key, spec in space.items()]
    for key, spec in entries:
        if not isinstance(spec, dict):
            out[key] = spec
            continue
        kind, args = next(iter(spec.items()))
        out[key] = {
            "choice": lambda a: tune.choice(a),
            "grid": lambda a: tune.grid_search(a),
            "uniform": lambda a: tune.uniform(float(a[0]), float(a[1])),
            "loguniform": lambda a: tune.loguniform(float(a[0]), float(a[1])),
            "randint": lambda a: tune.randint(int(a[0]), int(a[1]) + 1),
        }[kind](args)
    return out
