"""Durable writes: what a run renames into place is on disk first (fsync), so a power cut or a full disk leaves
the old file or the new one, never an empty or a torn one."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to disk. Folders cannot be opened on Windows: skipped there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under `folder`, then the folders themselves (their entries)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(root)


def replace_durably(source: str | Path, target: str | Path) -> None:
    """`os.replace(source, target)` with `source` (file or folder) flushed first and the rename itself flushed
    after (the parent folder's entry)."""
    source = Path(source)
    if source.is_dir():
        fsync_tree(source)
    else:
        fsync_path(source)
    os.replace(source, target)
    fsync_path(Path(target).parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` (its folder made if missing) through a temporary file renamed into place, durably:
    a crash leaves the previous file or none, never a torn one. The one way gd_hf writes a file in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # (ends in neither .json nor .png: globs skip it)
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_bytes_atomic` of `text` in UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def output_problem(path: str | Path, folder: bool, writable: bool = True) -> str | None:
    """Why a command cannot write its output `path` (a folder with `folder`, else a file), or None: it exists as the
    other kind, something above it is a file, or (`writable`) the folder it goes in does not let it be written.
    Checked before the work, so that the work is not lost."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            return f"{path} is a file, not a folder"
        if not folder and path.is_dir():
            return f"{path} is a folder: give a file name"
        where = path if path.is_dir() else path.parent
    else:
        where = next((parent for parent in path.parents if parent.exists()), Path("."))
        if not where.is_dir():
            return f"{where} is a file, not a folder: {path} cannot be made under it"
    if writable and not os.access(where, os.W_OK | os.X_OK):
        return f"{where} is not writable: {path} cannot be written"
    return None
