"""Atomic artefact writes and storage URIs.

Every artefact LatentForge writes (dataset folders, checkpoints, images, JSON) is written to a
temporary sibling first and renamed into place, so an interrupted write never leaves something
that looks complete. Remote storage (s3://, gs://, file://) goes through pyarrow filesystems.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from latentforge.errors import LatentForgeError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename.

    Args:
        path: destination file; its parent folder is created.
        data: the bytes to write.

    Returns:
        The destination as a `Path`.
    """
    path = Path(path)
    if not path.name or path.is_dir():
        raise LatentForgeError(f"cannot write {str(path) or repr('')}: it is a folder, not a file name; give a file path")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise LatentForgeError(f"cannot write {path}: {blocking} is a file, not a folder; choose another path")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # named by the destination, not the temporary file
        raise LatentForgeError(f"cannot write {path}: {e.strerror or e}; choose a writable path") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (see `atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented, key-sorted JSON atomically; NaN and infinities as null (`finite_json`),
    so that every file the platform writes is JSON any reader takes."""
    return atomic_write_text(path, json.dumps(finite_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None: JSON has no such numbers, and a
    strict reader (a browser, Starlette's responses) refuses a file or answer that holds one."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning a missing or corrupt file into a `LatentForgeError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise LatentForgeError(f"{path} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LatentForgeError(f"{path} is not valid JSON ({e}); the file is corrupt, recreate it") from e


def json_kind(path: str | os.PathLike) -> Any:
    """The "kind" a LatentForge JSON file declares (dataset manifest, registry entry, ...), or None
    where the file is missing, unreadable, not JSON or not a mapping: for checks that a folder is
    what it claims before touching it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError covers JSONDecodeError and UnicodeDecodeError
        return None
    return data.get("kind") if isinstance(data, dict) else None


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it to `final` only on success.

    Args:
        final: the folder to create.
        overwrite: replace an existing `final`; otherwise an existing folder is an error.

    Yields:
        The temporary folder to fill.

    Raises:
        LatentForgeError: `final` exists and `overwrite` is false.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise LatentForgeError(f"{final} already exists; choose another path or remove it first")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_files(tmp)  # the rename must never publish a folder whose files are still only in the page cache
        if final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_files(folder: Path) -> None:
    """Flush every file under `folder` to disk, then the folder itself (best effort where a
    filesystem cannot fsync a directory)."""
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_uri(path: str) -> bool:
    """True for `scheme://...` storage locations (s3://, gs://, file://, ...)."""
    return "://" in str(path)


def resolve_filesystem(uri: str):
    """Return `(pyarrow.fs.FileSystem, path)` for a local path or a pyarrow filesystem URI.

    Raises:
        LatentForgeError: the URI's scheme is not supported by the installed pyarrow.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError, OSError) as e:
        raise LatentForgeError(
            f"cannot open storage location {uri!r}: {e}; use a local path, file://, s3:// or gs://"
        ) from e


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])


def write_bytes_uri(uri: str, data: bytes) -> None:
    """Write a file at a local path or URI; local writes are atomic (temp + rename), object
    stores replace whole objects anyway."""
    if not is_uri(uri) or uri.startswith("file://"):
        atomic_write_bytes(uri[len("file://"):] if uri.startswith("file://") else uri, data)
        return
    fs, path = resolve_filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_bytes_uri(uri: str) -> bytes | None:
    """Read a file at a local path or URI; None when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = resolve_filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def append_line_uri(uri: str, line: str) -> None:
    """Append a line to a text file: a true append on local disk; object stores (which cannot
    append) get the whole file rewritten, fine for logs of a few thousand lines."""
    if not is_uri(uri) or uri.startswith("file://"):
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:
            # a process killed mid-write leaves a last line without its newline: end it, so that the
            # next record (a resumed run's) is a line of its own rather than glued to the fragment
            torn = False
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            f.write((b"\n" if torn else b"") + line.rstrip("\n").encode("utf-8") + b"\n")
        return
    old = read_bytes_uri(uri) or b""
    write_bytes_uri(uri, old + line.rstrip("\n").encode() + b"\n")
