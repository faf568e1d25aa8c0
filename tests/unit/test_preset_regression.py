"""Stored numbers: a few steps of every shipped preset, from a fixed seed on a tiny fixed input,
must reproduce the losses stored in `golden/preset_losses.json`.

This is the net under refactors and new model code: a change that alters what any preset
computes (an initialisation, a norm, the order of noise draws, a loss) fails here, even when
every behavioural test still passes. Each preset keeps its own architecture and widths (only the
batch is shrunk) so the test exercises the real networks.

Every preset runs twice: in fp32, and in bf16 with channels_last (the fast path); no metric may be
NaN or infinite in either. bf16 numbers depend on the CPU's kind: a CPU with AVX512-BF16/AMX runs
oneDNN's native bf16 kernels, one without emulates them, and the two differ by up to ~10% after
three steps. They are stored per kind, under `NAME@bf16` (native) and `NAME@bf16-emulated`; a
host compares with its own kind, and where that kind has no stored numbers yet it checks only
that every metric is finite, and says so.

Tolerance: fp32 rtol 1e-3, atol 1e-5 on every reported step metric (losses, D outputs), and rtol
5e-3 on the gradient norms. One torch thread makes the reductions' order fixed; what is left is
the CPU's vector width, which moves most numbers around 1e-6 relative after three steps, but the
augmented presets' generator gradient norm by up to 2.6e-3 (stylegan2-ada-color and
resnet-ada-color, numbers stored on an AVX2 host and replayed on an AVX512 one). bf16 rtol 1e-2, atol
1e-4 (d_acc, a count of 16, within 1/16): bf16 kernels differ more between CPU generations
(native bf16 instructions or emulation).

Updating the numbers is a deliberate act: run
    LATENTFORGE_UPDATE_GOLDEN=1 pytest tests/unit/test_preset_regression.py
and commit `golden/preset_losses.json` with the reason the numbers changed in the message.
A host with native bf16 records the emulated kind too when oneDNN and ATen are held to AVX2:
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 LATENTFORGE_UPDATE_GOLDEN=1 pytest ... -k bf16
(this replays the stored numbers of an AVX2 host for every preset that has not changed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import preset_input
from latentforge.algorithms.noise import GlobalNoise
from latentforge.config import PRECISION_MODES, load_experiment, preset_names
from latentforge.train.batches import InMemoryBatches
from latentforge.train.program import build_program

GOLDEN = Path(__file__).parent / "golden" / "preset_losses.json"
STEPS = 3
BATCH = 8
TOLERANCE = {"fp32": (1e-3, 1e-5), "bf16": (1e-2, 1e-4)}  # (rtol, atol)
MODES = {"fp32": PRECISION_MODES["fp32"], "bf16": PRECISION_MODES["bf16+channels_last"]}
# d_acc counts logits on the right side of 0 among 16 images: one logit near 0 that a CPU's bf16
# kernels round the other way moves it by 1/16, which no relative tolerance covers.
QUANTISED_ATOL = {"d_acc": 1 / 16 + 1e-6}
# A gradient norm sums every parameter's squared gradient: the number that rounding moves most
# between CPUs of different vector widths (module docstring). An initialisation or loss change
# moves it by far more than 0.5%.
GRAD_NORM_RTOL = {"grad_norm_g": 5e-3, "grad_norm_d": 5e-3}
def run_preset(name: str, mode: str = "fp32") -> list[dict[str, float]]:
    cfg = load_experiment(name, {"train.global_batch_size": BATCH, "train.tracking": "none", **MODES[mode]})
    split, spec = preset_input(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        program = build_program(cfg, spec, GlobalNoise(cfg.train.seed))
        it = InMemoryBatches(split, BATCH, cfg.train.seed).iterate()
        return [program.step([next(it) for _ in range(program.batches_per_step)], s) for s in range(STEPS)]
    finally:
        torch.set_num_threads(threads)


def _stored() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


def _key(name: str, mode: str) -> str:
    if mode == "fp32":
        return name
    from latentforge.algorithms.precision import native_bf16

    held_to_avx2 = (os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2"  # bf16 emulated (module docstring)
                    and os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "avx2")
    return f"{name}@{mode}" if native_bf16("cpu") and not held_to_avx2 else f"{name}@{mode}-emulated"


def test_every_preset_has_stored_numbers():
    stored = set(_stored())
    missing = sorted(set(preset_names()) - stored)
    missing += sorted(f"{n}@bf16" for n in preset_names() if not {f"{n}@bf16", f"{n}@bf16-emulated"} & stored)
    assert not missing, f"no stored numbers for {missing}: run LATENTFORGE_UPDATE_GOLDEN=1 pytest {__file__}"


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", preset_names())
def test_preset_reproduces_stored_losses(name, mode):
    got = run_preset(name, mode)
    key, (rtol, atol) = _key(name, mode), TOLERANCE[mode]
    for record in got:
        bad = [k for k, v in record.items() if not math.isfinite(v)]
        assert not bad, f"{key}: non-finite {bad}"
    if os.environ.get("LATENTFORGE_UPDATE_GOLDEN"):
        stored = _stored()
        stored[key] = [{k: float(f"{v:.8g}") for k, v in sorted(r.items())} for r in got]
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"stored new numbers for {key}; commit {GOLDEN.name} with the reason")
    expected = _stored().get(key)
    if expected is None and mode != "fp32":
        pytest.skip(f"no stored numbers for {key} (this kind of CPU's bf16 kernels); every metric was finite. "
                    "Record them on such a CPU with LATENTFORGE_UPDATE_GOLDEN=1")
    assert expected is not None, f"no stored numbers for {key}"
    assert len(got) == len(expected)
    for step, (g, e) in enumerate(zip(got, expected)):
        assert set(g) == set(e), f"{key} step {step}: metrics {sorted(g)} != stored {sorted(e)}"
        for k in e:
            tol = QUANTISED_ATOL.get(k, atol) if mode != "fp32" else atol
            rel = max(rtol, GRAD_NORM_RTOL.get(k, 0.0))
            assert math.isclose(g[k], e[k], rel_tol=rel, abs_tol=tol), (
                f"{key} step {step} {k}: {g[k]:.8g} != stored {e[k]:.8g} (rtol {rel}, atol {tol}); if the "
                "change is intended, regenerate with LATENTFORGE_UPDATE_GOLDEN=1 and say why in the commit")
