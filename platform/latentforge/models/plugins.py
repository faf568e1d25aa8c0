"""User architectures without forking: `model.arch: my_package.my_module:MyGenerator`.

A plug-in module is imported only when the user allowed it: by naming it in an experiment config
they train, with `--allow-plugin MODULE` (CLI), in `LATENTFORGE_PLUGINS` (comma-separated), or in
a Serve config's `allow_plugins`. A checkpoint naming a module never allows it by itself: a planted
`config.json` naming `os` or any unlisted module is refused before anything is imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re

from torch import nn

from latentforge.errors import CheckpointError

ENV_VAR = "LATENTFORGE_PLUGINS"
_MODULE = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_REF = re.compile(rf"^({_MODULE}):([A-Za-z_][A-Za-z0-9_]*)$")

_allowed: set[str] = set()


class PluginError(CheckpointError):
    """A plug-in architecture that is not allowed, cannot be imported, or is not a model."""


def is_plugin_ref(name: str) -> bool:
    """True for 'package.module:ClassName' references (built-in architectures have plain names)."""
    return bool(_REF.match(name))


def split_ref(ref: str) -> tuple[str, str]:
    """'pkg.mod:Cls' → ('pkg.mod', 'Cls').

    Raises:
        PluginError: not of that form.
    """
    m = _REF.match(ref)
    if not m:
        raise PluginError(f"{ref!r} is not a plug-in reference; write it as package.module:ClassName")
    return m.group(1), m.group(2)


def allow_plugins(modules) -> None:
    """Allow importing these modules (and their sub-modules) as plug-in architectures."""
    for mod in modules:
        mod = mod.strip()
        if not mod:
            continue
        if not re.fullmatch(_MODULE, mod):
            raise PluginError(f"{mod!r} is not a module name; give a dotted module path such as my_package.models")
        _allowed.add(mod)


def allowed_modules() -> list[str]:
    """Modules allowed in this process (explicit calls and the environment variable)."""
    env = {m.strip() for m in os.environ.get(ENV_VAR, "").split(",") if m.strip()}
    return sorted(_allowed | env)


def is_allowed(module: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed_modules())


def plugin_provenance(cls: type) -> dict:
    """Where a plug-in class comes from: its module, and the installed distribution and version
    that provide it (so a checkpoint can say what to install)."""
    module = cls.__module__
    top = module.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top, [])
    version = None
    if dists:
        try:
            version = importlib.metadata.version(dists[0])
        except importlib.metadata.PackageNotFoundError:
            version = None
    return {"module": module, "distribution": dists[0] if dists else None, "version": version}


def class_ref(cls: type) -> str:
    """'module:Class' for a class defined at the top level of its module.

    Raises:
        PluginError: a nested or local class (a checkpoint could not name it).
    """
    ref = f"{cls.__module__}:{cls.__qualname__}"
    if not _REF.match(ref):
        raise PluginError(f"{ref} cannot be recorded in a checkpoint: define plug-in classes at the top level of a module")
    return ref


def load_plugin_class(ref: str, *, trusted: bool = False, provenance: dict | None = None) -> type[nn.Module]:
    """Import and return the class a plug-in reference names.

    Args:
        ref: 'package.module:ClassName'.
        trusted: the reference comes from the user's own experiment config (allowed by naming it).
        provenance: what the checkpoint recorded (distribution, version), for the install hint.

    Raises:
        PluginError: not allowed, not importable, or not an nn.Module class.
    """
    module, attr = split_ref(ref)
    if not (trusted or is_allowed(module)):
        raise PluginError(
            f"the model uses plug-in module {module!r}, which is not allowed in this process; if you trust it, "
            f"allow it with --allow-plugin {module} (or {ENV_VAR}={module}, or allow_plugins in a Serve config)"
        )
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        dist = (provenance or {}).get("distribution")
        version = (provenance or {}).get("version")
        hint = (f"the checkpoint says it was made with {dist} {version or ''}".rstrip()
                + f"; if you trust that package, install it (pip install {dist}{'==' + version if version else ''})"
                if dist else f"install the package that provides {module}, or put it on PYTHONPATH")
        raise PluginError(f"cannot import plug-in module {module!r} ({e}); {hint}") from e
    except Exception as e:  # the module itself is broken: its import raised
        raise PluginError(f"importing plug-in module {module!r} failed: {type(e).__name__}: {e}") from e
    cls = getattr(mod, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise PluginError(f"{ref} is not a torch.nn.Module class")
    return cls
