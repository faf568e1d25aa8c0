"""Host memory kept between training steps (latentforge/host_memory.py): after warm-up a step writes
to pages it already has, where glibc's defaults hand them back and fault them in again every step."""

import os
import subprocess
import sys
import textwrap

from pathlib import Path

import pytest

from latentforge.host_memory import OPT_OUT, SETTINGS, USER_SETTINGS, set_thresholds, why_not

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


def _clean_env(**extra) -> dict:
    """This environment without any malloc setting, preload or opt-out of the user's, plus `extra`."""
    drop = (*USER_SETTINGS, "GLIBC_TUNABLES", "LD_PRELOAD", OPT_OUT)
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _run(code: str, *args: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], env=_clean_env(**env), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _thp_always() -> bool:  # a fault then maps 2 MiB at once, and default counts are far lower
    f = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return f.is_file() and "[always]" in f.read_text()


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_a_training_step_reuses_its_pages_instead_of_faulting_them_in():
    default, kept = float(_run(STEP_FAULTS, "default").split()[-1]), float(_run(STEP_FAULTS, "keep").split()[-1])
    # one 64x32x28x28 fp32 activation alone is 1,568 pages: the default faults in several per step
    if not _thp_always():
        assert default > 1000, f"glibc's defaults faulted only {default} pages per step: the premise of host_memory.py"
    assert kept < max(50.0, default / 20), f"{kept} page faults per step with freed memory kept (default: {default})"


def test_the_settings_passed_to_mallopt_and_a_refusal():
    calls = []
    assert set_thresholds(lambda p, v: calls.append((p, v)) or 1) is None
    assert calls == [(-3, 32 << 20), (-1, 2**31 - 1), (-2, 64 << 20)] == list(SETTINGS)  # glibc's malloc.h numbers
    refused = set_thresholds(lambda p, v: 0 if p == -1 else 1)
    assert refused == f"mallopt refused parameter -1 = {2**31 - 1}"


def test_users_own_malloc_settings_and_allocators_are_left_alone():
    for key in USER_SETTINGS:
        reason = why_not({key: "131072"})
        assert reason is not None and key in reason
    assert "GLIBC_TUNABLES" in why_not({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"})
    assert why_not({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) == why_not({})  # not about malloc: ours to set
    assert "jemalloc" in why_not({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"})
    assert "tcmalloc" in why_not({"LD_PRELOAD": "libtcmalloc_minimal.so.4"})
    for off in ("0", "false", "No", "off "):
        assert why_not({OPT_OUT: off}) == f"{OPT_OUT}={off}"
    for on in ("1", "yes", "On"):
        assert why_not({OPT_OUT: on}) == why_not({})
    assert "not understood: use 0 (off) or 1 (the default)" in why_not({OPT_OUT: "all"})


def test_a_user_setting_is_reported_and_decided_once():
    code = ("from latentforge.host_memory import keep_freed_host_memory as k; "
            "print(k()); print(k())")
    first, second = _run(code, MALLOC_TRIM_THRESHOLD_="131072").split("\n")[:2]
    assert first == "left as is: MALLOC_TRIM_THRESHOLD_ is set by the user"
    assert second == first


def test_the_opt_out_reaches_ray_workers(monkeypatch):
    import ray

    import latentforge.ray_cluster as rc

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setenv(OPT_OUT, "0")
    rc.ray_init(address="ray://nowhere:10001")  # joining a cluster: its workers do not inherit this environment
    assert seen["runtime_env"]["env_vars"][OPT_OUT] == "0"
    monkeypatch.delenv(OPT_OUT)
    rc.ray_init(address="ray://nowhere:10001")
    assert OPT_OUT not in seen["runtime_env"]["env_vars"]


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


def test_a_misspelt_choice_is_a_warning_not_a_crash(monkeypatch, capsys):
    import latentforge.host_memory as hm
    from latentforge.cli import main

    monkeypatch.setattr(hm, "_applied", None)
    monkeypatch.setenv(OPT_OUT, "everything")
    assert main(["presets"]) == 0
    err = capsys.readouterr().err
    assert "warning: host memory left as is: LATENTFORGE_KEEP_HOST_MEMORY='everything' is not understood" in err
