"""Host memory kept between training steps (train/host_memory.py): after warm-up a step writes to
pages it already has, where glibc's defaults hand them back and fault them in again every step."""

import os
import subprocess
import sys
import textwrap

import pytest

from latentforge.host_memory import USER_SETTINGS, why_not

GLIBC = why_not({}) is None

# A tiny conv net's training step (64 x 32 x 28 x 28 fp32 activations, as in dcgan-mnist's generator),
# run in a fresh process: malloc's settings are per process and cannot be undone.
STEP_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "keep":
        from latentforge.host_memory import keep_freed_host_memory
        assert keep_freed_host_memory() == "kept"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 1, 3, padding=1))
    x = torch.randn(64, 1, 28, 28)
    def step():
        net(x).square().mean().backward()
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
""")


def _faults_per_step(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in (*USER_SETTINGS, "LD_PRELOAD", "LATENTFORGE_KEEP_HOST_MEMORY")}
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_a_training_step_reuses_its_pages_instead_of_faulting_them_in():
    default, kept = _faults_per_step("default"), _faults_per_step("keep")
    # one 64x32x28x28 fp32 activation alone is 1,568 pages: the default faults in several per step
    assert default > 1000, f"glibc's defaults faulted only {default} pages per step: the premise of host_memory.py"
    assert kept < 50, f"{kept} page faults per step with freed memory kept (default: {default})"


def test_users_own_malloc_settings_and_allocators_are_left_alone():
    for key in USER_SETTINGS:
        reason = why_not({key: "131072"})
        assert reason is not None and key in reason
    assert "jemalloc" in why_not({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"})
    assert "tcmalloc" in why_not({"LD_PRELOAD": "libtcmalloc_minimal.so.4"})
    assert why_not({"LATENTFORGE_KEEP_HOST_MEMORY": "0"}) == "LATENTFORGE_KEEP_HOST_MEMORY=0"
    assert why_not({"LATENTFORGE_KEEP_HOST_MEMORY": "1"}) == why_not({})


def test_a_user_setting_is_reported_not_overridden():
    code = ("from latentforge.host_memory import keep_freed_host_memory as k; "
            "print(k()); print(k())")
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = out.stdout.split("\n")[:2]
    if GLIBC:
        assert first == "left as is: MALLOC_TRIM_THRESHOLD_ is set by the user"
    assert second == first  # decided once per process


def test_every_training_run_keeps_freed_memory(monkeypatch, mnist_dir, tmp_path):
    import latentforge.train.loop as loop
    from helpers import tiny
    from latentforge.train.local import train_local

    calls = []
    monkeypatch.setattr(loop, "keep_freed_host_memory", lambda: calls.append(1) or "kept")
    train_local(tiny("dcgan-mnist", train__steps=2), mnist_dir, tmp_path, log=lambda *_: None)
    assert calls == [1]  # in run_training, which Ray Train workers and Tune trials run too


def test_every_cli_verb_keeps_freed_memory(monkeypatch, capsys):
    import latentforge.host_memory as hm
    from latentforge.cli import main

    calls = []
    monkeypatch.setattr(hm, "keep_freed_host_memory", lambda: calls.append(1) or "kept")
    assert main(["presets"]) == 0 and calls == [1]
    assert "dcgan-mnist" in capsys.readouterr().out
