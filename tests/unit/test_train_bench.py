"""`bench train`'s precision modes: how speed-ups are computed on a machine whose speed drifts
(the step loop is replaced by a fake with known costs; nothing here is timed)."""

import pytest

from latentforge.bench import train_bench
from latentforge.errors import ConfigError


class _FakeLoop:
    """A mode's loop whose step costs 2 units in fp32 and 1 in bf16, times a machine slowdown that
    changes every round (one call per mode per round), as on a host shared with other work."""

    calls = 0
    ORDER_OF_MODES = 2

    def __init__(self, cfg, data_dir, warmup, device="cpu"):
        self.cost = 1.0 if cfg.train.precision == "bf16" else 2.0
        self.images_per_step, self.first_step_s, self.flops_per_image = 64, 0.0, 1e6

    @classmethod
    def slowdown(cls) -> float:
        return 1.0 + 0.5 * (cls.calls // cls.ORDER_OF_MODES % 3)  # 1, 1.5, 2, 1, ... (per round)

    def timed(self, steps: int) -> float:
        seconds = steps * self.cost * self.slowdown()
        _FakeLoop.calls += 1
        return seconds


def _fake_peak(device="cpu", dtype=None):
    """A matmul peak that drifts with the machine: 100 GFLOP/s (fp32) or 400 (bf16) at full speed."""
    return (400.0 if dtype is not None else 100.0) / _FakeLoop.slowdown()


def test_each_speed_up_compares_modes_within_a_round(monkeypatch):
    """The modes run interleaved, a round at a time, and a speed-up is the median of per-round
    ratios: a machine that slows down 2x between rounds leaves bf16's 2x speed-up exact, where
    timing the modes one after another would have reported anything from 1x to 4x. The share of
    the peak compares each round with the peak measured in that round, so it is exact too."""
    monkeypatch.setattr(train_bench, "_PlainLoop", _FakeLoop)
    monkeypatch.setattr(train_bench, "matmul_peak_gflops", _fake_peak)
    _FakeLoop.calls = 0
    lines = []
    out = train_bench.bench_modes("dcgan-mnist", "unused", warmup=0, steps=30, device="cpu",
                                  modes=("fp32", "bf16+channels_last"), log=lines.append, rounds=6)
    bf16 = out["modes"]["bf16+channels_last"]
    assert bf16["speedup_over_fp32"] == pytest.approx(2.0) and bf16["speedup_range"] == pytest.approx([2.0, 2.0])
    # fp32: 32 images/s x 1 MFLOP = 0.032 GFLOP/s of 100 at full speed; bf16: 0.064 of 400
    assert out["modes"]["fp32"]["fraction_of_peak_range"] == pytest.approx([0.032 / 100] * 2)
    assert bf16["fraction_of_peak"] == pytest.approx(0.064 / 400)
    assert out["rounds"] == 6 and _FakeLoop.calls == 12  # every mode timed once per round
    assert sum("round " in ln for ln in lines) == 6  # each round is shown as it ends


def test_rounds_that_cannot_each_hold_a_step_are_refused_before_anything_runs(monkeypatch):
    monkeypatch.setattr(train_bench, "_PlainLoop", None)  # would fail if anything were built
    for rounds, steps in [(0, 10), (11, 10)]:
        with pytest.raises(ConfigError, match=rf"--rounds {rounds} with --steps {steps}: give 1\.\.10 rounds"):
            train_bench.bench_modes("dcgan-mnist", "unused", warmup=0, steps=steps, device="cpu", rounds=rounds)
