"""Benchmarks (`latentforge bench ...`): ratios measured side by side in one run."""

from __future__ import annotations


def mnist5k_unless(data_dir: str | None) -> str:
    """`data_dir`, or mnist5k prepared in a fresh temporary folder when none is given (so every
    benchmark runs on a machine with nothing prepared)."""
    if data_dir is not None:
        return str(data_dir)
    import tempfile
    from pathlib import Path

    from latentforge.data.prepare import prepare_dataset

    out = str(Path(tempfile.mkdtemp(prefix="lf-bench-data-")) / "mnist5k")
    prepare_dataset("mnist5k", out, log=lambda *_: None)
    return out
