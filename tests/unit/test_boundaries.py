"""Rules of the house, held by tests: the ML core never imports Ray, and unit tests never start a
Ray cluster.

The Ray boundary is checked on the modules themselves, two ways:
- statically: every import statement of every core module, at any depth (also the ones inside
  functions, which run later), followed through the package's own modules, must never reach
  `ray`; a violation names the chain of imports that gets there;
- at run time: importing every core module in a fresh interpreter leaves `ray` out of sys.modules.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import subprocess
import sys

import pytest

import latentforge

# The ML core (ARCHITECTURE.md): runs without Ray. Packages include all their modules.
CORE_PACKAGES = ("latentforge.models", "latentforge.algorithms", "latentforge.metrics", "latentforge.editing")
CORE_MODULES = (
    "latentforge.checkpoint", "latentforge.builders", "latentforge.config", "latentforge.images",
    "latentforge.sampling", "latentforge.storage", "latentforge.errors", "latentforge.registry",
    "latentforge.data", "latentforge.data.spec", "latentforge.data.dataset", "latentforge.data.prepare",
    "latentforge.data.sources", "latentforge.data.shapes", "latentforge.data.stream",
    # the Ray-free halves of the wiring packages: the shared training loop, the pure policies, the serving engine
    "latentforge.train.loop", "latentforge.train.program", "latentforge.train.batches", "latentforge.train.local",
    "latentforge.train.run_dir", "latentforge.train.setup", "latentforge.devices", "latentforge.tune.instability", "latentforge.tune.rungs", "latentforge.serve.engine",
)


def all_modules() -> dict[str, str]:
    """Every module of the package: name → source file."""
    out = {"latentforge": latentforge.__file__}
    for info in pkgutil.walk_packages(latentforge.__path__, "latentforge."):
        spec = importlib.util.find_spec(info.name)
        out[info.name] = spec.origin
    return out


def core_modules() -> list[str]:
    names = all_modules()
    core = [m for m in CORE_MODULES if m in names]
    core += [m for m in names if any(m == p or m.startswith(p + ".") for p in CORE_PACKAGES)]
    return sorted(set(core))


def imported_names(source_file: str, module: str) -> set[str]:
    """Absolute names of everything a module imports, anywhere in its body."""
    tree = ast.parse(open(source_file, encoding="utf-8").read(), source_file)
    package = module if source_file.endswith("__init__.py") else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


def ray_chain(start: str, modules: dict[str, str]) -> list[str] | None:
    """The import chain from `start` to Ray, or None (depth-first through latentforge modules)."""
    seen: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in seen:
            return None
        seen.add(name)
        for imp in sorted(imported_names(modules[name], name)):
            if imp == "ray" or imp.startswith("ray."):
                return path + [imp]
            if imp in modules:
                found = visit(imp, path + [imp])
                if found:
                    return found
        return None

    return visit(start, [start])


def test_core_module_list_is_current():
    """Every named core module exists (a rename must update this test, not silently drop a check)."""
    names = all_modules()
    assert [m for m in CORE_MODULES if m not in names] == []
    assert len(core_modules()) >= 30


@pytest.mark.parametrize("module", core_modules())
def test_core_module_never_imports_ray(module):
    chain = ray_chain(module, all_modules())
    assert chain is None, (
        f"{module} reaches Ray through {' -> '.join(chain)}; the ML core must run without Ray "
        "(ARCHITECTURE.md): move the Ray wiring into train/ray_*.py, tune/sweep.py or serve/app.py")


def test_importing_the_core_loads_no_ray():
    code = ("import importlib, sys\n"
            f"for m in {core_modules()!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"importing the core loaded Ray: {out.stdout[-500:]}"


def test_unit_tests_cannot_start_a_ray_cluster():
    import ray

    with pytest.raises(RuntimeError, match="unit test tried to start a Ray cluster"):
        ray.init(num_cpus=1)
    assert not ray.is_initialized()
