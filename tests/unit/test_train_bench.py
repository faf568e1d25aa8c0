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


class _SteadilySlowingMachine:
    """Every measurement (a plain-loop stretch or a Ray run) happens one slot later, and the
    machine's speed falls 10% of its start per slot: bracketing a Ray run between the plain runs
    just before and after it cancels a linear drift exactly."""

    slot = 0

    @classmethod
    def speed(cls) -> float:
        v = 640.0 * (1 - 0.1 * cls.slot)
        cls.slot += 1
        return v


class _FakePlain:
    def __init__(self, cfg, data_dir, warmup, device="cpu"):
        self.images_per_step, self.first_step_s, self.flops_per_image = 64, 0.0, 1e6

    def timed(self, steps: int) -> float:
        return self.images_per_step * steps / _SteadilySlowingMachine.speed()


def _fake_ray_run(cfg, data_dir, workers, warmup, steps, storage, data_loader, use_gpu):
    return {"images_per_s": (0.9 if workers == 1 else 1.5) * _SteadilySlowingMachine.speed()}


def _on_fake_machine(monkeypatch, ray_run, peak):
    """bench_train's Ray part with fake plain loops, Ray runs and peaks on _SteadilySlowingMachine."""
    import latentforge.ray_cluster

    monkeypatch.setattr(train_bench, "_PlainLoop", _FakePlain)
    monkeypatch.setattr(train_bench, "ray_run", ray_run)
    monkeypatch.setattr(train_bench, "matmul_peak_gflops", peak)
    monkeypatch.setattr(latentforge.ray_cluster, "ray_init", lambda *a, **k: None)
    monkeypatch.setattr(train_bench.tempfile, "mkdtemp", lambda prefix: "unused")
    monkeypatch.setattr(train_bench.torch, "set_num_threads", lambda n: None)  # leave the test process as it was
    _SteadilySlowingMachine.slot = 0


def test_ray_overhead_is_measured_against_the_plain_runs_around_each_ray_run(monkeypatch):
    """Ray Train with 1 worker at 0.9x the plain loop, 2 workers at 1.5x, on a machine that slows
    down steadily to a fifth of its speed over the run: b/a and c/a come out exact (0.9, 1.5), where
    comparing the median Ray run with the median plain run (the old method) reads 1.05 and 0.75."""
    _on_fake_machine(monkeypatch, _fake_ray_run,  # the peak drifts with the machine: 100 GFLOP/s at full speed
                     lambda device="cpu", dtype=None: 100.0 * (1 - 0.1 * _SteadilySlowingMachine.slot))
    lines = []
    out = train_bench.bench_train("dcgan-mnist", "unused", warmup=0, steps=10, modes=(), log=lines.append, ray_rounds=3,
                                  ray_settle_s=0)  # no settling: every slot of the fake machine is a measurement
    assert out["ratio_b_over_a"] == pytest.approx(0.9) and out["ratio_b_over_a_range"] == pytest.approx([0.9, 0.9])
    assert out["ratio_c_over_a"] == pytest.approx(1.5)
    assert len(out["a_plain_runs_images_per_s"]) == 5 and len(out["b_ray1_runs_images_per_s"]) == 3  # a (b a)x3 c a
    assert _SteadilySlowingMachine.slot == 9
    assert any("b/a = 0.900 (median of 3" in ln for ln in lines)
    # (a)'s share of the peak: each plain run against the peak measured with it, 0.64 of 100 GFLOP/s
    # at full speed, so exactly 0.64% whatever the drift
    assert out["a_fraction_of_peak"] == pytest.approx(640 * 1e6 / 1e9 / 100)


def test_a_ray_run_without_a_timed_window_is_left_out_and_said(monkeypatch):
    """A Ray run whose log has no window after the warm-up has no speed (NaN): b/a is the median of
    the measured rounds, not a NaN or a value that depends on where the NaN sorted."""
    calls = []

    def ray_run(cfg, data_dir, workers, warmup, steps, storage, data_loader, use_gpu):
        calls.append(workers)
        out = _fake_ray_run(cfg, data_dir, workers, warmup, steps, storage, data_loader, use_gpu)
        return {"images_per_s": float("nan")} if len(calls) == 2 else out

    _on_fake_machine(monkeypatch, ray_run, lambda device="cpu", dtype=None: 100.0)
    lines = []
    out = train_bench.bench_train("dcgan-mnist", "unused", warmup=0, steps=10, modes=(), log=lines.append, ray_rounds=3,
                                  ray_settle_s=0)
    assert out["ratio_b_over_a"] == pytest.approx(0.9) and len(out["b_ray1_runs_images_per_s"]) == 3
    assert out["b_ray1_images_per_s"] == out["b_ray1_images_per_s"]  # not NaN: the median of the two measured runs
    assert any("1 of 3 Ray runs logged no window" in ln for ln in lines)


def test_ray_rounds_below_one_are_refused_before_anything_runs(monkeypatch):
    monkeypatch.setattr(train_bench, "_PlainLoop", None)  # would fail if anything were built
    with pytest.raises(ConfigError, match=r"--ray-rounds 0: give 1 or more"):
        train_bench.bench_train("dcgan-mnist", "unused", warmup=0, steps=10, modes=(), ray_rounds=0)


class _SteadyPlain(_FakePlain):
    """A plain loop at a steady 640 images/s (64 a step: 10 steps a second) that counts its steps."""

    steps = 0

    def timed(self, steps: int) -> float:
        _SteadyPlain.steps += steps
        return self.images_per_step * steps / 640.0


def test_ray_runs_warm_up_past_the_clusters_start_up(monkeypatch):
    """After the cluster starts, the plain loop steps untimed for `ray_settle_s` seconds; the Ray
    runs' warm-up is as many steps as the plain loop runs in that time (10 a second here), never
    fewer than --warmup; 2 workers on GPUs, which step up to twice as fast, warm up twice as long;
    0 s keeps --warmup. The timed steps stay --steps."""
    seen = []

    def ray_run(cfg, data_dir, workers, warmup, steps, storage, data_loader, use_gpu):
        seen.append((workers, warmup, steps))
        return {"images_per_s": 600.0}

    cases = [(10.0, 0, False, 100, 100), (10.0, 250, False, 250, 250), (0.0, 20, False, 20, 20),
             (2.5, 0, False, 25, 25), (10.0, 0, True, 100, 200)]
    for settle, warmup, gpu, expected, expected_c in cases:
        _on_fake_machine(monkeypatch, ray_run, lambda device="cpu", dtype=None: 100.0)
        monkeypatch.setattr(train_bench, "_PlainLoop", _SteadyPlain)
        monkeypatch.setattr(train_bench.torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(train_bench.torch.cuda, "is_available", lambda: True)  # a machine with 2 GPUs
        seen.clear()
        _SteadyPlain.steps = 0
        lines = []
        out = train_bench.bench_train("dcgan-mnist", "unused", warmup=warmup, steps=10, modes=(), log=lines.append,
                                      ray_rounds=2, ray_settle_s=settle, use_gpu=gpu)
        assert seen == [(1, expected, 10), (1, expected, 10), (2, expected_c, 10)]
        assert out["ray_warmup_steps"] == expected and out["ray_settle_s"] == settle
        assert any(f"warm up for {expected} steps ({expected_c} with 2 workers)" in ln for ln in lines)
        # settling (settle s at 10 steps a second, in stretches of 1 step; one more where the sum of
        # the stretches' float seconds falls short by a rounding) then 4 timed plain runs of 10
        assert _SteadyPlain.steps - 4 * 10 in (round(settle * 10), round(settle * 10) + 1)


def test_the_ray_warm_up_keeps_the_step_count_when_the_plain_speed_is_unknown():
    assert train_bench.ray_warmup_steps(20, float("nan"), 64) == 20
    assert train_bench.ray_warmup_steps(20, 0.0, 64) == 20
    assert train_bench.ray_warmup_steps(20, 1280.0, 64, settle_s=10) == 200


def test_a_settling_time_that_is_not_a_finite_number_of_seconds_is_refused_before_anything_runs(monkeypatch):
    monkeypatch.setattr(train_bench, "_PlainLoop", None)  # would fail if anything were built
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"--ray-settle .*: give 0 or more seconds"):
            train_bench.bench_train("dcgan-mnist", "unused", warmup=0, steps=10, modes=(), ray_settle_s=bad)


def test_the_ray_runs_train_the_plain_loops_model(monkeypatch, tmp_path):
    """`--set model.g_width=128` (or a YAML preset) reached the plain loop only: the Ray runs rebuilt
    the preset by name, so b/a compared two different models."""
    import json

    import latentforge.train.ray_train as ray_train
    from latentforge.config import load_experiment

    seen = []

    def fake_train_ray(cfg, data_dir, **kw):
        seen.append(cfg)
        (tmp_path / "run").mkdir(exist_ok=True)
        records = [{"step": s, "step_time_s": 0.1} for s in (2, 4, 6)]
        (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return {"run_dir": str(tmp_path / "run")}

    monkeypatch.setattr(ray_train, "train_ray", fake_train_ray)
    cfg = load_experiment("dcgan-mnist", {"model.g_width": 128, "gan.lr_d": 1e-3})
    out = train_bench.ray_run(cfg, tmp_path, workers=1, warmup=2, steps=4, storage=str(tmp_path), data_loader="stream",
                              use_gpu=False)
    ran = seen[0]
    assert (ran.model.g_width, ran.gan.lr_d, ran.train.steps) == (128, 1e-3, 6) and out["windows"] == 2


def test_flops_are_counted_over_a_whole_period_of_the_lazy_regularisers():
    """One counted step holds R1 (every 16th D update in StyleGAN2) or not depending on --warmup,
    which moved GFLOP/s and the share of the peak; the count now spans the regularisers' period."""
    from latentforge.config import load_experiment

    def period(preset, **o):
        return train_bench.regulariser_period(load_experiment(preset, o))

    assert period("dcgan-mnist") == 1 and period("vae-mnist") == 1
    assert period("dcgan-mnist", **{"gan.r1_weight": 1.0, "gan.r1_interval": 16}) == 16
    assert period("dcgan-mnist", **{"gan.r1_weight": 1.0, "gan.r1_interval": 16, "gan.n_critic": 2}) == 8  # 2 D updates a step
    assert period("stylegan2-mnist", **{"gan.r1_weight": 1.0, "gan.r1_interval": 16, "gan.pl_weight": 2.0,
                                        "gan.pl_interval": 3}) == 48
