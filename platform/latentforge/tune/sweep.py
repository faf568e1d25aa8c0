"""Ray Tune wiring for sweeps (`latentforge tune SWEEP_YAML --data DIR`).

Each trial is a Tune function trainable that runs a data-parallel Ray Train V2 `TorchTrainer`
(a V2 trainer is not itself a Tune trainable). A Ray Train callback forwards every report, with
its checkpoint path, through a Ray queue to the trial, which calls `tune.report` with a Tune
checkpoint that wraps the Train checkpoint: ASHA sees the metric, the instability stopper sees
losses and gradient norms, and PBT can exploit (a restored trial warm-starts from
`tune.get_checkpoint()` with its new hyperparameters applied).
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from latentforge.checkpoint import CONFIG, SWEEP_FILE, SWEEP_SUMMARY
from latentforge.errors import ConfigError, LatentForgeError
from latentforge.storage import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from latentforge.tune.instability import InstabilityPolicy, StopDecision
from latentforge.tune.rungs import RungRecheck
from latentforge.tune.space import (
    SweepConfig,
    check_metric_for_data,
    distinct_points,
    experiment_for,
    trial_params,
    tune_param_space,
)

STOP_REASONS_FILE = "stop_reasons.json"
# A trial stopped because its FID degraded had good checkpoints before it fell apart; a trial
# stopped for NaNs, a dead generator, a winning discriminator or mode collapse is never promoted.
PROMOTABLE_STOP_REASONS = {"fid_degradation", "below_rung_cutoff"}


# ---------------------------------------------------------------------------------------- stopper
def stop_reasons(sweep_dir: str | Path) -> dict[str, dict]:
    """The stop reasons a sweep folder holds, by trial id (empty where there are none)."""
    path = Path(sweep_dir) / STOP_REASONS_FILE
    try:
        reasons = read_json(path) if path.is_file() else {}
    except LatentForgeError:
        return {}
    return reasons if isinstance(reasons, dict) else {}


class InstabilityStopper:
    """A Tune `Stopper` that asks the instability policy (and, under ASHA, the rung re-check);
    reasons are kept on disk so that the results table shows them (and a resumed sweep still
    knows them)."""

    def __init__(self, policy: InstabilityPolicy, sweep_dir: str, rungs: RungRecheck | None = None,
                 loss_of: Callable[[dict], str | None] = lambda params: None):
        self.policy, self.sweep_dir, self.rungs, self.loss_of = policy, sweep_dir, rungs, loss_of
        self._losses: dict[tuple, str | None] = {}  # by the trial's parameters (PBT can change them)
        self._warm_starts: dict[str, object] = {}  # each trial's last warm start (PBT exploit or restore)
        self.reasons: dict[str, dict] = stop_reasons(sweep_dir)

    def __setstate__(self, state: dict) -> None:
        # A resumed sweep's Tune restores the stopper pickled when the sweep began, with the
        # reasons it knew then; the file holds every session's.
        self.__dict__.update(state)
        self.__dict__.setdefault("_warm_starts", {})  # pickled by an earlier version
        self.reasons = {**self.reasons, **stop_reasons(self.sweep_dir)}
        if self.rungs is not None:
            replay_rungs(self.rungs, Path(self.sweep_dir) / "tune")

    def __call__(self, trial_id: str, result: dict) -> bool:
        # Tune puts the trial's sampled parameters in every result: a trial whose space sets
        # gan.loss is judged by its own loss's rules, not the base preset's.
        params = result.get("config") or {}
        key = tuple(sorted((k, repr(v)) for k, v in params.items()))
        if key not in self._losses:
            self._losses[key] = self.loss_of(params)
        warm = result.get("warm_start", result.get("warm_started_at_step"))
        if trial_id in self._warm_starts and warm != self._warm_starts[trial_id] and trial_id not in self.reasons:
            self.policy.forget(trial_id)  # another trial's weights now: its best FID and streaks are not this one's
        self._warm_starts[trial_id] = warm
        decision: StopDecision = self.policy.observe(trial_id, result, loss=self._losses[key])
        if self.rungs is not None:  # sees every result, so that its rungs are complete
            behind = self.rungs.observe(trial_id, result)
            decision = decision if decision.stop else behind
        if decision.stop and trial_id not in self.reasons:
            self.reasons[trial_id] = {"reason": decision.reason, "detail": decision.detail, "step": result.get("step")}
            _tune_metrics()["stopped"].inc(tags={"reason": decision.reason})
            Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
            self.reasons = {**stop_reasons(self.sweep_dir), **self.reasons}  # never drop another session's
            atomic_write_json(Path(self.sweep_dir) / STOP_REASONS_FILE, self.reasons)
        return decision.stop

    def stop_all(self) -> bool:
        return False


def replay_rungs(rungs: RungRecheck, experiment: Path) -> int:
    """Record at the rungs every result the sweep's trials reported before it stopped (each trial
    folder's result.json): the stopper a resumed sweep restores is the one pickled when it began,
    with empty rungs, so finished trials no longer counted towards any cut. Returns the results read."""
    import json

    n = 0
    for path in sorted(experiment.glob("*/result.json")):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                result = json.loads(line)
            except ValueError:
                continue  # a line cut short by the crash
            if isinstance(result, dict) and result.get("trial_id"):
                rungs.observe(str(result["trial_id"]), result)  # records only; decisions are for live trials
                n += 1
    return n


_METRICS: dict = {}


def _tune_metrics() -> dict:
    """Driver-side Ray metrics for the dashboards (created once, on first use)."""
    if not _METRICS:
        from ray.util.metrics import Counter, Gauge

        _METRICS["stopped"] = Counter("latentforge_tune_trials_stopped", "Trials stopped by the instability policy",
                                      tag_keys=("reason",))
        _METRICS["running"] = Gauge("latentforge_tune_trials_running", "Sweep trials running now")
    return _METRICS


def _trial_counter_callback():
    """A Tune callback keeping the running-trials gauge current."""
    from ray.tune import Callback

    class RunningTrials(Callback):
        def __init__(self):
            self.running: set[str] = set()

        def _set(self):
            _tune_metrics()["running"].set(len(self.running))

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(trial.trial_id)
            self._set()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)
            self._set()

        on_trial_error = on_trial_complete

    return RunningTrials()


def _as_tune_stopper(stopper: InstabilityStopper):
    from ray.tune import Stopper

    class _Stopper(Stopper):
        def __call__(self, trial_id, result):
            return stopper(trial_id, result)

        def stop_all(self):
            return stopper.stop_all()

    return _Stopper()


# ---------------------------------------------------------------------------------------- trial
class _ForwardReports:
    """Ray Train callback (runs in the Train controller): puts each rank-0 record and the
    checkpoint path into the trial's queue."""

    def __new__(cls, queue):
        from ray.train.v2.api.callback import UserCallback

        class Forward(UserCallback):
            def __init__(self, q):
                self.q = q

            def after_report(self, run_context, metrics, checkpoint):
                self.q.put((dict(metrics[0]), checkpoint.path if checkpoint else None))

        return Forward(queue)


def _clean(record: dict) -> dict:
    """Tune results: numbers only (strings like last_checkpoint are dropped)."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def sweep_trial(config: dict, sweep: dict, data_dir: str, forward_all: bool = True) -> None:
    """The Tune function trainable: one trial = one Ray Train run of the sampled config."""
    import ray
    from ray import tune
    from ray.util.queue import Empty, Queue

    from latentforge.train.ray_train import make_trainer
    from latentforge.train.run_dir import RunDir

    from latentforge.data.dataset import PreparedDataset
    from latentforge.data.spec import DataSpec
    from latentforge.train.setup import check_training_setup

    sw = SweepConfig.model_validate(sweep)
    cfg = experiment_for(sw, config)
    ds = PreparedDataset(data_dir)  # a sampled configuration is held to the same checks as a train
    check_training_setup(cfg, DataSpec.from_dataset(ds), sw.workers_per_trial, ds.manifest["splits"]["train"]["count"],
                         use_gpu=sw.gpus)
    trial_dir = Path(tune.get_context().get_trial_dir())
    attempt = uuid.uuid4().hex[:8]
    name, attempt_id = f"attempt-{attempt}", int(attempt, 16)
    queue = Queue(maxsize=4, actor_options={"num_cpus": 0})
    tune_ckpt = tune.get_checkpoint()
    outcome: dict = {}

    def fit(resume_from):
        try:
            trainer = make_trainer(cfg, data_dir, sw.workers_per_trial, RunDir(str(trial_dir / "train" / name)),
                                   use_gpu=sw.gpus, max_failures=0, data_loader=sw.data_loader,
                                   resume_from=resume_from, callbacks=[_ForwardReports(queue)])
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the trial's thread below
            outcome["error"] = e

    def run(resume_from):
        thread = threading.Thread(target=fit, args=(resume_from,), daemon=True)
        thread.start()
        start_step = None
        best = None  # the trial's best metric so far: what ASHA ranks (GAN metrics are noisy step to step)
        while True:
            try:
                record, ckpt_path = queue.get(timeout=0.5)
            except Empty:
                if not thread.is_alive():
                    break
                continue
            if start_step is None:
                start_step = record.get("attempt_start_step", 0)
            if not forward_all and sw.metric not in record:
                continue
            result = _clean(record)
            value = result.get(sw.metric)
            if value is not None and math.isfinite(value):
                best = value if best is None else (min(best, value) if sw.mode == "min" else max(best, value))
            if best is not None:
                result[f"{sw.metric}_best"] = best
            if resume_from is not None:
                result["warm_started_at_step"] = start_step
                result["warm_start"] = attempt_id  # which warm start: two exploits may start at one step
            checkpoint = tune.Checkpoint.from_directory(ckpt_path) if ckpt_path else None
            tune.report(result, checkpoint=checkpoint)
        if "error" in outcome:
            raise outcome["error"]

    try:
        if tune_ckpt is not None:
            with tune_ckpt.as_directory() as folder:  # PBT exploit or trial restore: warm start
                saved = read_json(Path(folder) / "config.json")
                if int(saved.get("step", 0)) >= cfg.train.steps:
                    # a resumed sweep restoring a trial that had already finished: nothing to train
                    tune.report({**_clean(saved.get("metrics", {})), "warm_started_at_step": saved["step"]})
                    return
                run(folder)
        else:
            run(None)
    finally:
        ray.kill(queue.actor)


# ---------------------------------------------------------------------------------------- driver
def _scheduler(sw: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if sw.scheduler.kind == "asha":
        # ASHA ranks trials by their best value so far: FID of a GAN jumps by 2x between
        # evaluations, and ranking on the last value cut the eventual winner at a rung.
        return ASHAScheduler(time_attr="step", metric=f"{sw.metric}_best", mode=sw.mode, max_t=sw.steps,
                             grace_period=sw.scheduler.grace_period, reduction_factor=sw.scheduler.reduction_factor)
    if sw.scheduler.kind == "pbt":
        mutations, bounds = _pbt_mutations(sw)
        if not mutations:
            raise ConfigError("scheduler pbt needs at least one sampled dimension in space to mutate")
        return PopulationBasedTraining(time_attr="step", metric=sw.metric, mode=sw.mode,
                                       perturbation_interval=sw.scheduler.perturbation_interval,
                                       quantile_fraction=sw.scheduler.quantile_fraction,
                                       resample_probability=sw.scheduler.resample_probability,
                                       hyperparam_mutations=mutations, custom_explore_fn=ClampToSpace(bounds),
                                       # every report reaches the stopper (report_every), not only the
                                       # evaluations that carry the metric PBT ranks on
                                       require_attrs=False, synch=False)
    return FIFOScheduler()


def _pbt_mutations(sw: SweepConfig) -> tuple[dict, dict]:
    """PBT's mutations, and the range of each continuous one.

    PBT perturbs a Tune domain by multiplying its value by 0.8 or 1.2, and steps along a plain
    list. So a `choice` goes as its list (a text choice multiplied crashed the sweep; a number
    choice left its list: widths 16/32 became 13 and 19), and a perturbed `uniform`,
    `loguniform` or `randint` value is brought back into its range (beta1 0.9 x 1.2 = 1.08
    failed every trial it reached)."""
    from ray.tune.search.sample import Categorical

    mutations, bounds = {}, {}
    for key, domain in tune_param_space(sw).items():
        if not hasattr(domain, "sample"):
            continue
        if isinstance(domain, Categorical):
            mutations[key] = list(domain.categories)
        else:
            mutations[key] = domain
            integer = type(domain).__name__ == "Integer"  # tune.randint's upper bound is exclusive
            bounds[key] = (domain.lower, domain.upper - 1 if integer else domain.upper, integer)
    return mutations, bounds


class ClampToSpace:
    """PBT's `custom_explore_fn`: a perturbed value back inside its dimension's range."""

    def __init__(self, bounds: dict):
        self.bounds = bounds

    def __call__(self, config: dict) -> dict:
        for key, (low, high, integer) in self.bounds.items():
            if key in config:
                value = min(max(config[key], low), high)
                config[key] = int(round(value)) if integer else float(value)
        return config


def _search(sw: SweepConfig):
    if sw.search.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise ConfigError("search.algorithm optuna needs optuna: pip install optuna") from e
        return OptunaSearch(metric=sw.metric, mode=sw.mode, seed=sw.search.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # max_concurrent here: Tune ignores max_concurrent_trials when given a generator instance.
    # A finite space is sampled without replacement (each point replaces one random sample).
    return BasicVariantGenerator(random_state=sw.search.seed, max_concurrent=sw.max_concurrent,
                                 points_to_evaluate=distinct_points(sw))


def _checkpoint_config(sw: SweepConfig):
    """Keep each trial's best two checkpoints (by the metric; Tune also keeps the latest). PBT keeps
    them all: a trial that exploits another restores the checkpoint that was best when it decided,
    which the source trial may have moved past by the time the copy starts."""
    from ray.tune import CheckpointConfig

    if sw.scheduler.kind == "pbt":
        return CheckpointConfig(num_to_keep=None)
    return CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=sw.metric, checkpoint_score_order=sw.mode)


def trial_loss(sw: SweepConfig, params: dict) -> str | None:
    """The adversarial loss of the trial with these sampled parameters (None for VAEs)."""
    cfg = experiment_for(sw, params)
    return cfg.gan.loss if cfg.algorithm == "gan" else None


def run_sweep(sw: SweepConfig, data_dir: str, out: str | None = None, resume: bool = False,
              address: str | None = None, registry: str | None = None, gpus: bool = False, log=print) -> dict:
    """Run (or resume) a sweep, write its summary, and promote the best trial.

    Args:
        sw: the validated sweep.
        data_dir: prepared dataset (its feature network is trained first if the metric needs it).
        out: the sweep folder (default sweeps/<name>-<time>); with `resume`, the folder to continue.
        resume: continue an interrupted sweep, keeping finished trials.
        address: an existing cluster (default: a local one).
        registry: promote the best trial's checkpoint here (None: do not promote).
        gpus: train every trial on GPUs (`--gpus`), whatever the sweep's `gpus` says.

    Returns:
        The summary (rows, best trial, totals).
    """
    from ray import tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    from latentforge.metrics.features import ensure_feature_net
    from latentforge.ray_cluster import ray_init

    from latentforge.storage import is_uri

    for flag, where in (("--out", out), ("--data", data_dir)):
        if where and is_uri(str(where)):
            raise ConfigError(f"{flag} {where}: a sweep reads and writes local folders (on a cluster, a shared "
                              "filesystem mounted on every node); give a path")
    check_metric_for_data(sw, data_dir)
    sweep_dir = Path(out) if out else Path("sweeps") / f"{sw.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = sweep_dir.resolve()
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise ConfigError(f"--out {sweep_dir} is a file, not a folder; choose another --out")
    if resume:
        if not (sweep_dir / SWEEP_FILE).is_file():
            raise ConfigError(f"{sweep_dir} is not a sweep folder (no {SWEEP_FILE}); give the --out of the sweep to resume")
        saved = read_json(sweep_dir / SWEEP_FILE)
        _check_resumed_sweep(sw, saved, data_dir, sweep_dir)
        sw = SweepConfig.model_validate(saved["sweep"])
    elif sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise ConfigError(f"sweep folder {sweep_dir} exists; choose another --out or pass --resume to continue it")
    turned_on = gpus and not sw.gpus
    if turned_on:
        sw = sw.model_copy(update={"gpus": True})
    ray_init(address)
    if sw.gpus:  # before the sweep folder is written or a feature network trained: a refused sweep leaves nothing
        _check_sweep_gpus(sw, address, log)
    ensure_feature_net(data_dir, log=log)  # every trial's periodic evaluation loads it
    if not resume:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from latentforge.data.dataset import PreparedDataset

        atomic_write_json(sweep_dir / SWEEP_FILE, {"sweep": sw.model_dump(mode="json"), "data": str(Path(data_dir).resolve()),
                                                   "data_hash": PreparedDataset(data_dir).content_hash,
                                                   "created_unix": int(time.time()), "reports": "all"})
    elif turned_on:  # `--resume --gpus`: later resumes keep the GPUs too
        saved = read_json(sweep_dir / SWEEP_FILE)
        atomic_write_json(sweep_dir / SWEEP_FILE, {**saved, "sweep": sw.model_dump(mode="json")})
    # Trials report every `report_every` steps so the stopper sees losses and gradient norms
    # between evaluations; those reports carry no metric, which ASHA skips by design.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    rungs = None
    if sw.scheduler.kind == "asha" and sw.scheduler.recheck_rungs:
        rungs = RungRecheck(sw.scheduler.grace_period, sw.scheduler.reduction_factor, sw.steps, f"{sw.metric}_best", sw.mode)
    stopper = InstabilityStopper(InstabilityPolicy(sw.stopper), str(sweep_dir), rungs,
                                 loss_of=lambda params: trial_loss(sw, params))
    # A PBT sweep begun before every report was forwarded restores its scheduler as pickled then,
    # which raises on a report without the metric: its trials keep sending only evaluations.
    forward_all = sw.scheduler.kind != "pbt" or not resume or saved.get("reports") == "all"  # `saved`: the resume's
    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, sweep=sw.model_dump(mode="json"), data_dir=str(Path(data_dir).resolve()),
                             forward_all=forward_all),
        {"cpu": 0.1},  # the trial only waits on its Train run, whose workers hold the CPUs
    )
    experiment = str(sweep_dir / "tune")
    log(f"sweep {sw.name}: {trial_count(sw)} trials x {sw.steps} steps, {sw.scheduler.kind} + instability stopper, folder {sweep_dir}")
    if resume and Tuner.can_restore(experiment):
        tuner = Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True,
                              param_space=tune_param_space(sw))
    else:
        tuner = Tuner(
            trainable,
            param_space=tune_param_space(sw),
            tune_config=TuneConfig(num_samples=sw.trials, scheduler=_scheduler(sw), search_alg=_search(sw),
                                   max_concurrent_trials=sw.max_concurrent, reuse_actors=False),
            run_config=RunConfig(name="tune", storage_path=str(sweep_dir), stop=_as_tune_stopper(stopper),
                                 checkpoint_config=_checkpoint_config(sw), callbacks=[_trial_counter_callback()],
                                 verbose=1),
        )
    grid = tuner.fit()
    # the file, not this object: a resumed sweep's Tune calls the stopper it restored, not this one
    summary = summarize(sw, grid, {**stopper.reasons, **stop_reasons(sweep_dir)}, sweep_dir, log=log)
    if not summary.get("best"):
        log(f"no trial reported a finite {sw.metric} (each errored, diverged or stopped before its first evaluation "
            f"at step {sw.eval_every}): nothing {'promoted' if registry else 'to promote'}; see "
            f"{sweep_dir / 'summary.md'} and the trials' logs under {sweep_dir / 'tune'}")
    elif registry and _may_replace(sw, registry, summary["best"]["metric"], sweep_dir, log):
        from latentforge.registry import promote

        best = summary["best"]
        entry = promote(best["checkpoint"], registry, sw.promote_as or sw.name, overwrite=True,
                        metrics={sw.metric: best["metric"], **best.get("metrics", {})},
                        lineage={"sweep": sw.name, "sweep_dir": str(sweep_dir), "trial_id": best["trial_id"],
                                 "hyperparameters": best["config"]})
        summary["promoted"] = {"registry": registry, "name": entry["name"]}
        atomic_write_json(sweep_dir / SWEEP_SUMMARY, summary)  # a trial without a metric: null (atomic_write_json)
        log(f"promoted trial {best['trial_id']} ({sw.metric} {best['metric']:.4g}) to {registry} as {entry['name']!r}")
    return summary


def trial_count(sw: SweepConfig) -> int:
    """Trials the sweep runs: Tune repeats a grid for each of `trials` samples."""
    return sw.trials * math.prod(len(spec["grid"]) for spec in sw.space.values() if isinstance(spec, dict) and "grid" in spec)


def _may_replace(sw: SweepConfig, registry: str, value: float, sweep_dir: Path, log) -> bool:
    """Whether the sweep's best may take the registry name: a free name, an entry this sweep folder
    promoted (a resumed sweep), or an entry it beats on the sweep's metric. Another sweep's better
    model, or one promoted by hand, is kept and the log says how to replace it anyway."""
    from latentforge.registry import RegistryError, UnknownModel, show

    name = sw.promote_as or sw.name
    try:
        entry = show(registry, name, list_known=False)
    except UnknownModel:
        return True
    except RegistryError as e:  # an entry that cannot be read cannot be served either
        log(f"replacing {name!r} in {registry}: its entry cannot be read ({e})")
        return True
    if (entry.get("lineage") or {}).get("sweep_dir") == str(sweep_dir):
        return True
    metrics = entry.get("metrics") or {}
    theirs = metrics.get(sw.metric)
    if sw.metric in metrics and theirs is None:  # stored as null: it was NaN or infinite
        return True
    if isinstance(theirs, (int, float)) and math.isfinite(theirs) and (value < theirs if sw.mode == "min" else value > theirs):
        return True
    held = f"{sw.metric} {theirs:.4g}" if isinstance(theirs, (int, float)) else f"no {sw.metric}"
    log(f"kept {name!r} in {registry} ({held}, not beaten by this sweep's best {value:.4g}); to replace it anyway: "
        f"latentforge registry promote CHECKPOINT --registry {registry} --name {name} --overwrite (the best "
        "checkpoint is in summary.json), or set promote_as to another name")
    return False


def _check_resumed_sweep(sw: SweepConfig, saved: dict, data_dir, sweep_dir: Path) -> None:
    """A resumed sweep runs the sweep it started with, on its own data: a YAML edited since (a fixed
    range, another metric) or another dataset is refused by name rather than silently ignored."""
    from latentforge.data.dataset import PreparedDataset

    given = sw.model_dump(mode="json")
    # as this version reads the saved sweep (fields added since take their defaults); --gpus may be
    # turned on at a resume
    try:
        kept = {**SweepConfig.model_validate(saved["sweep"]).model_dump(mode="json"), "gpus": given["gpus"]}
    except (ValueError, KeyError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"{sweep_dir / SWEEP_FILE} holds a sweep this version cannot read ({str(e)[:300]}); start a "
                          "new sweep with another --out") from None
    changed = sorted(k for k in set(given) | set(kept) if given.get(k) != kept.get(k))
    if changed:
        raise ConfigError(f"the sweep YAML differs from the one {sweep_dir.name} started with ({', '.join(changed)}); a "
                          "resumed sweep keeps its own space and settings: resume with the same YAML, or start a new "
                          "sweep with another --out")
    old, new = saved.get("data"), str(Path(data_dir).resolve())
    if saved.get("data_hash") and saved["data_hash"] != PreparedDataset(new).content_hash:
        raise ConfigError(f"--data {data_dir} is not the dataset sweep {sweep_dir.name} ran on ({old}: its content hash "
                          "differs, prepared again since?); its trials resume from checkpoints of that data: resume "
                          "with it, or start a new sweep")
    if old and old != new and not saved.get("data_hash"):
        try:  # a sweep saved before its dataset's hash was: the old folder's, if it is still there
            same = PreparedDataset(old).content_hash == PreparedDataset(new).content_hash
        except LatentForgeError:
            same = False
        if not same:
            raise ConfigError(f"--data {data_dir} is not the dataset sweep {sweep_dir.name} ran on ({old}); its trials "
                              "resume from checkpoints of that data: resume with it, or start a new sweep")


def _check_sweep_gpus(sw: SweepConfig, address: str | None, log) -> None:
    """A GPU sweep's trials each ask `workers_per_trial` GPUs: refused where even one trial could
    never be placed (a local cluster), and said where the GPUs run fewer trials at once than
    `max_concurrent` (the others queue, so the sweep takes longer than its settings suggest)."""
    from latentforge.ray_cluster import check_gpus_for

    have = check_gpus_for(sw.workers_per_trial, address, log=log, workers_flag="workers_per_trial",
                          gpus_flag="--gpus (or the sweep's gpus: true)")
    fit = int(have // sw.workers_per_trial)
    if 1 <= fit < sw.max_concurrent:
        log(f"note: {have:g} GPU(s) run {fit} trial(s) of {sw.workers_per_trial} GPU worker(s) at once, "
            f"not max_concurrent {sw.max_concurrent}; the other trials queue")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _params_at(checkpoint: str, params: dict) -> dict:
    """`params`' dotted keys as the checkpoint's own experiment config holds them (a key it lacks,
    or an unreadable config, keeps the given value)."""
    try:
        experiment = read_json(Path(checkpoint) / CONFIG)["experiment"]
    except (LatentForgeError, KeyError, TypeError):
        return dict(params)
    out = {}
    for key, value in params.items():
        node = experiment
        for part in key.split("."):
            node = node.get(part, value) if isinstance(node, dict) else value
        out[key] = node
    return out


def summarize(sw: SweepConfig, grid, reasons: dict, sweep_dir: Path, log=print) -> dict:
    """Results table (markdown + JSON) and a metric-vs-steps plot in the sweep folder."""
    from latentforge.images import line_chart_png

    better = min if sw.mode == "min" else max
    rows, series = [], {}
    best = None
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or (Path(result.path).name if result.path else "?")
        df = result.metrics_dataframe
        history = []
        if df is not None and sw.metric in df and "step" in df:
            history = [(float(s), float(m)) for s, m in zip(df["step"], df[sw.metric]) if _finite(m)]
        steps_used = int(df["step"].max()) if df is not None and "step" in df and len(df) else 0
        best_metric = better((m for _, m in history), default=float("nan"))
        config = trial_params(sw, result.config or {})  # with families: the chosen family's parameters only
        if trial_id in reasons:
            status = f"stopped: {reasons[trial_id]['reason']}"
        elif result.error is not None:
            status = f"error: {type(result.error).__name__}"
        elif steps_used >= sw.steps:
            status = "completed"
        else:
            status = f"stopped by {sw.scheduler.kind}"
        row = {"trial_id": trial_id, "config": config, "best_metric": best_metric, "steps_used": steps_used,
               "status": status, "detail": reasons.get(trial_id, {}).get("detail", "")}
        rows.append(row)
        series[f"{trial_id}"] = history
        promotable = trial_id not in reasons or reasons[trial_id]["reason"] in PROMOTABLE_STOP_REASONS
        ckpts = [(c, m) for c, m in (result.best_checkpoints or []) if promotable and _finite(m.get(sw.metric))]
        if ckpts:
            c, m = better(ckpts, key=lambda cm: cm[1][sw.metric])
            # under PBT a trial's final config may have been mutated or copied after its best
            # checkpoint: the lineage takes the values that checkpoint trained with
            at_best = _params_at(c.path, config) if sw.scheduler.kind == "pbt" else config
            candidate = {"trial_id": trial_id, "metric": m[sw.metric], "checkpoint": c.path, "config": at_best,
                         "step": m.get("step"), "metrics": {k: m[k] for k in ("fid", "recall", "class_coverage") if k in m}}
            improves = best is None or (candidate["metric"] < best["metric"] if sw.mode == "min"
                                        else candidate["metric"] > best["metric"])
            if improves:
                best = candidate
    total_steps = sum(r["steps_used"] for r in rows)
    summary = {"sweep": sw.name, "metric": sw.metric, "mode": sw.mode, "trials": len(rows),
               "total_steps": total_steps, "max_steps": trial_count(sw) * sw.steps, "rows": rows, "best": best}
    atomic_write_json(sweep_dir / SWEEP_SUMMARY, summary)  # a trial without a metric: null (atomic_write_json)
    keys = sorted({k for r in rows for k in r["config"]})
    from latentforge.metrics.registry import METRICS

    protocol = ("reconstruction of up to 1,000 validation images" if "vae" in METRICS[sw.metric].requires else
                f"{sw.eval_samples} samples against the training split in the dataset's feature network")
    lines = [f"# Sweep {sw.name}", "", f"metric: {sw.metric}, {METRICS[sw.metric].description} ({protocol}); "
             f"{'lower' if sw.mode == 'min' else 'higher'} is better; scheduler: {sw.scheduler.kind}; "
             f"steps used: {total_steps} of {trial_count(sw) * sw.steps} possible", "",
             "| trial | " + " | ".join(keys) + f" | best {sw.metric} | steps | status |",
             "| --- | " + " | ".join("---" for _ in keys) + " | ---: | ---: | --- |"]
    for r in sorted(rows, key=lambda r: (not _finite(r["best_metric"]), r["best_metric"] * (1 if sw.mode == "min" else -1) if _finite(r["best_metric"]) else 0)):
        vals = [f"{r['config'].get(k):.3g}" if isinstance(r["config"].get(k), float) else str(r["config"].get(k)) for k in keys]
        lines.append(f"| {r['trial_id']} | " + " | ".join(vals) + f" | {r['best_metric']:.4g} | {r['steps_used']} | {r['status']} |")
    if best:
        lines += ["", f"best: trial {best['trial_id']}, {sw.metric} {best['metric']:.4g} at step {best['step']}"]
    atomic_write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    atomic_write_bytes(sweep_dir / f"{sw.metric}_vs_steps.png",
                       line_chart_png(series, f"{sw.name}: {sw.metric} per trial", "step", sw.metric,
                                      log_y=sw.metric in ("fid", "kid")))
    log("\n".join(lines))
    log(f"summary: {sweep_dir / 'summary.md'}, plot: {sweep_dir / f'{sw.metric}_vs_steps.png'}")
    return summary
