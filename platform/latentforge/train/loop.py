"""The training loop shared by single-process runs and Ray Train workers (no Ray imports).

Life cycle: set up (program, resume) → train (step, log, sample, checkpoint) → final report.
Everything distributed is injected: the worker's rank/world/device and DDP wrapper
(`WorkerContext`), where batches come from (`BatchStream`), and where records, artefacts and
checkpoints go (`RunSink`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from latentforge.algorithms.batch import Batch
from latentforge.algorithms.noise import GlobalNoise
from latentforge.algorithms.precision import AUTO, emulation_warning, resolved_config
from latentforge.data.dataset import Split
from latentforge.data.spec import DataSpec
from latentforge.checkpoint import load_module_weights, load_training_state, save_checkpoint
from latentforge.config import experiment_to_dict
from latentforge.images import grid_png
from latentforge.devices import settle, tf32_off
from latentforge.host_memory import keep_freed_host_memory
from latentforge.train.program import TrainingProgram, build_program
from latentforge.tune.instability import InstabilityPolicy, unstable_warning


def rescale_position(consumed: int, old_batch: int, new_batch: int, rows: int | None) -> int:
    """Global batches of `new_batch` images that resume after the images `consumed` batches of
    `old_batch` took. Every epoch drops its last `rows % batch` images, so whole epochs stay whole
    epochs and only the partial epoch's images are converted (without `rows`, a plain conversion)."""
    if not rows or rows < max(old_batch, new_batch):
        return consumed * old_batch // new_batch
    epochs, within = divmod(consumed, rows // old_batch)
    return epochs * (rows // new_batch) + within * old_batch // new_batch


@dataclass
class WorkerContext:
    """Where this copy of the loop runs."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m  # DDP wrapper on Ray workers
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # all-reduce average of metrics

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


class BatchStream(Protocol):
    def iterate(self, start: int = 0) -> Iterator[Batch]:
        """Batches forever, positioned after `start` global batches."""


class RunSink(Protocol):
    """Where a run's outputs go. Every worker calls `report` at the same steps (a barrier on Ray);
    only the chief's record and checkpoint are kept."""

    def report(self, record: dict, checkpoint: tuple[str, Callable[[Path], None]] | None) -> None:
        """Publish a log record and, when given, a checkpoint `(name, write)`: `write(folder)`
        fills a folder that the sink stores under `name` in the run folder."""

    def artifact(self, relpath: str, data: bytes) -> None:
        """Store a file in the run folder (chief only)."""


def checkpoint_name(step: int) -> str:
    """Checkpoint folder name inside a run folder: step_000500."""
    return f"step_{step:06d}"


def _fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_progress(record: dict, total: int) -> str:
    """One console line per log record, readable in a terminal and in `ray job logs`."""
    keys = ["d_loss", "g_loss", "d_real", "d_fake"] if "g_loss" in record else ["loss", "nll", "kl"]
    keys += [k for k in ("fid", "recall", "class_coverage") if k in record]
    losses = " ".join(f"{k} {record[k]:.4g}" for k in keys if k in record)
    ckpt = f" | ckpt {record['last_checkpoint']}" if record.get("last_checkpoint") else ""
    return (f"step {record['step']:>6}/{total} | {record['images_per_sec']:8.1f} img/s | {losses} | "
            f"ETA {_fmt_duration(record['eta_s'])}{ckpt}")


def _settled_clock(device: torch.device) -> float:
    """`time.perf_counter()` once the device has finished the work queued on it (CUDA runs ahead)."""
    settle(device)
    return time.perf_counter()


def _resume_order(position: int, saved: str | None, stream) -> tuple[int, str | None]:
    """The data position to resume at, and a note when it moved: an epoch read in another order
    than the one the run started (a changed shuffle window, another loader) would repeat some of
    its images and skip others, so the resume starts the next epoch instead."""
    current = getattr(stream, "order", None)
    per_epoch = getattr(stream, "batches_per_epoch", 0)
    if saved is None or current is None or saved == current or not per_epoch or position % per_epoch == 0:
        return position, None
    nxt = (position // per_epoch + 1) * per_epoch
    return nxt, (f"note: the run read its epochs in another order ({saved}, now {current}: another shuffle window "
                 f"or data loader); it resumes at the start of the next epoch (batch {nxt}, not {position}), so no "
                 "image repeats within an epoch")


def run_training(
    cfg,
    spec: DataSpec,
    stream: BatchStream,
    ctx: WorkerContext,
    sink: RunSink,
    resume_from: str | Path | None = None,
    log: Callable[[str], None] = print,
    evaluate: Callable[[TrainingProgram, int], dict] | None = None,
    inference_data: Callable[[], Split] | None = None,
) -> dict:
    """Train `cfg` to `cfg.train.steps` steps.

    Args:
        cfg: a validated experiment config.
        spec: the data the models are built for.
        stream: this worker's batches.
        ctx: rank, world size, device and DDP wrapper.
        sink: receives records, samples and checkpoints.
        resume_from: a checkpoint folder to continue from (weights, optimisers, step, RNG, data position).
        log: console printer (chief only).
        evaluate: periodic evaluation (chief only) every `cfg.train.eval_every` steps, merged
            into the record.
        inference_data: a sample of training images (chief only) that readying the model for
            sampling reads: a VAE fits its latent prior to their posterior means.

    Returns:
        The last record.
    """
    keep_freed_host_memory()  # each step's tensors reuse the last step's pages (host_memory.py)
    asked_auto = cfg.train.precision == AUTO
    cfg = resolved_config(cfg, ctx.device.type)  # the checkpoints record the precision and layout used
    chosen = cfg.train.precision if asked_auto else None
    t = cfg.train
    world = ctx.world_size
    noise = GlobalNoise(t.seed, ctx.rank, world, ctx.device)
    program = build_program(cfg, spec, noise, ctx.device, ctx.wrap, ctx.reduce_mean,
                            inference_data if ctx.is_chief else None)
    per_worker = t.global_batch_size // world
    start, last_ckpt = 0, None
    if resume_from is not None:
        load_module_weights(resume_from, program.modules())
        state = load_training_state(resume_from)
        for name, opt in program.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        program.apply_hyperparameters()  # the config's learning rates win over the checkpoint's
        program.load_state_dict(state.get("algorithm", {}))
        start = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        if ctx.device.type == "cuda" and "cuda" in state["rng"]:  # for plug-ins that draw from torch's generator
            torch.cuda.set_rng_state(state["rng"]["cuda"], ctx.device)
        last_ckpt = Path(resume_from).name
        # The data position is global batches consumed, which does not depend on the worker
        # count: a run may resume on a different number of workers with the same global batch.
        batches_consumed = int(state["data"]["batches_consumed"])
        saved_world = int(state.get("world_size", world))
        saved_batch = int(state["data"].get("global_batch_size", t.global_batch_size))
        if saved_batch != t.global_batch_size:  # keep the images seen, not the count of batches
            batches_consumed = rescale_position(batches_consumed, saved_batch, t.global_batch_size,
                                                getattr(stream, "rows", None))
        if ctx.is_chief:
            log(f"resumed from {resume_from} at step {start}")
            if saved_batch != t.global_batch_size:
                log(f"note: the global batch changed from {saved_batch} to {t.global_batch_size}; the data resumes "
                    f"after the same images ({batches_consumed} batches of the new size)")
            if saved_world != world:
                log(f"note: the run trained on {saved_world} worker(s) and resumes on {world}; the global batch is "
                    f"{t.global_batch_size} (per worker {saved_batch // saved_world} -> {per_worker})")
        batches_consumed, moved = _resume_order(batches_consumed, state["data"].get("order"), stream)
        if moved and ctx.is_chief:
            log(moved)
    else:
        batches_consumed = 0
    if start >= t.steps:  # the CLI refuses this before launching (train/resume.py); a library call is told
        log(f"nothing to train: the checkpoint is at step {start} and train.steps is {t.steps}")
        return {}
    it = stream.iterate(batches_consumed)
    experiment = experiment_to_dict(cfg)

    def write_checkpoint(step_done: int, metrics: dict):
        def write(folder: Path):
            save_checkpoint(
                folder, algorithm=cfg.algorithm, experiment=experiment, data=spec, modules=program.modules(),
                step=step_done, metrics=metrics, overwrite=True,
                training_state={
                    "step": step_done,
                    "optimizers": {k: o.state_dict() for k, o in program.optimizers.items()},
                    "rng": {"torch": torch.get_rng_state(),
                            **({"cuda": torch.cuda.get_rng_state(ctx.device)} if ctx.device.type == "cuda" else {})},
                    "algorithm": program.state_dict(),
                    "data": {"batches_consumed": batches_consumed + (step_done - start) * program.batches_per_step,
                             "global_batch_size": t.global_batch_size, "order": getattr(stream, "order", None)},
                    "world_size": world,
                },
            )
        return write

    if ctx.is_chief:
        log(f"training {cfg.name} ({cfg.algorithm}) for {t.steps} steps on {world} worker(s): "
            f"global batch {t.global_batch_size}, per-worker batch {per_worker}, device {ctx.device}, "
            f"{t.precision}{' + channels_last' if t.channels_last else ' NCHW'}")
        if chosen is not None:
            log(f"train.precision=auto: {chosen} on this {ctx.device.type} "
                + ("(it runs bf16 natively)" if chosen == "bf16" else "(bf16 would be emulated here, several times slower)"))
        slow = emulation_warning(t.precision, ctx.device.type)
        if slow:
            log(slow)
        if start == 0:
            with tf32_off():
                sink.artifact("samples/step_000000.png", grid_png(program.sample()))

    # the chief watches its own records with the sweeps' instability policy and says once when the
    # run has died (e.g. a hinge D at its margins with G's samples all black), instead of silently
    # training on; the run goes on, as the user asked for its steps
    watch = InstabilityPolicy(loss=cfg.gan.loss if cfg.algorithm == "gan" else "ns") if ctx.is_chief else None
    window: list[dict] = []
    window_start = time.perf_counter()
    window_steps = 0
    window_aside = 0.0  # seconds of the window spent readying samples, not training (left out of its speed)
    run_start, steps_timed = time.perf_counter(), 0
    record: dict = {}
    for step in range(start, t.steps):
        batches = [next(it) for _ in range(program.batches_per_step)]
        window.append(program.step(batches, step))
        window_steps += 1
        done = step + 1
        if step == start and t.compile and ctx.is_chief:  # compilation happens in the first step: say what it cost
            log(f"first step took {time.perf_counter() - window_start:.1f} s, torch.compile included")
        is_last = done == t.steps
        eval_due = bool(t.eval_every) and (done % t.eval_every == 0 or is_last)
        log_due = done % t.log_every == 0 or is_last or done == start + 1 or eval_due
        ckpt_due = done % t.checkpoint_every == 0 or is_last
        sample_due = done % t.sample_every == 0 or is_last
        readying = ctx.is_chief and (sample_due or ckpt_due or (eval_due and evaluate is not None))
        if readying:
            aside_start = _settled_clock(ctx.device)  # a GPU's queued steps belong to the window, not to this
            note = program.prepare_inference()  # the chief's samples, evaluation and checkpoint see the same model
            if note and is_last:
                log(note)
            if sample_due:
                with tf32_off():
                    sink.artifact(f"samples/step_{done:06d}.png", grid_png(program.sample()))
            window_aside += _settled_clock(ctx.device) - aside_start
        if not (log_due or ckpt_due):
            continue
        keys = list(window[0])
        mean = torch.tensor([[m[k] for k in keys] for m in window], dtype=torch.float64).mean(0)
        mean = ctx.reduce_mean(mean.to(ctx.device)).cpu().tolist()
        # the window's training time: a GAN's standing BatchNorm statistics (50 G passes), a VAE's
        # prior fit and the sample grid are not steps (dcgan-mnist's took 0.49 s on 2 cores, 10 of
        # its steps: a tenth of a 100-step window; docs/performance.md)
        elapsed = time.perf_counter() - window_start - window_aside
        steps_timed += window_steps
        total_elapsed = time.perf_counter() - run_start
        images = window_steps * t.global_batch_size * program.batches_per_step
        record = {
            "step": done,
            # the data position in images: after a resume with another global batch, the images
            # seen up to the rescaled position (which keeps whole epochs, and counts an epoch's
            # rest skipped by a changed order), not steps x today's batch
            "images_seen": (batches_consumed + (done - start) * program.batches_per_step) * t.global_batch_size,
            "attempt_images": (done - start) * program.batches_per_step * t.global_batch_size,
            "images_per_sec": images / max(elapsed, 1e-9),
            "step_time_s": elapsed / window_steps,
            "eta_s": (t.steps - done) * total_elapsed / max(steps_timed, 1),
            "attempt_start_step": start,  # after a restart, later records for a step supersede earlier ones
            "world_size": world,
            "global_batch_size": t.global_batch_size,
            "per_worker_batch_size": per_worker,
            **dict(zip(keys, mean)),
        }
        if evaluate is not None and ctx.is_chief and eval_due:
            with tf32_off():
                record.update(evaluate(program, done))
        if ckpt_due:
            last_ckpt = checkpoint_name(done)
            program.sync_state()  # every worker: rank 0's checkpoint then holds the global state
        record["last_checkpoint"] = last_ckpt
        sink.report(record, (last_ckpt, write_checkpoint(done, dict(record))) if ckpt_due else None)
        if ctx.is_chief:
            log(format_progress(record, t.steps))
            if watch is not None:
                decision = watch.observe("run", record)
                if decision.stop:
                    log(unstable_warning(decision))
                    watch = None  # once
        window, window_steps, window_start, window_aside = [], 0, time.perf_counter(), 0.0
    return record
