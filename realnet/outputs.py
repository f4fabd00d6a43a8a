"""Output folders of ``eval`` and ``predict``: never mix runs, and delete only what a run wrote.

Torch-free, so a deployed (exported) model can use the same rules.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from sia.errors import InputError


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"--batch-size: expected a positive integer, got {batch_size!r}")
    return batch_size


def check_out_folder(out: str | Path, overwrite: bool) -> Path:
    """Refuse an ``--out`` that is a file, or a non-empty folder unless ``overwrite``: results of an
    earlier run must never be replaced (or mixed with new ones) silently."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise InputError(f"--out {folder}: folder is not empty; pass --overwrite to replace its results or choose another folder")
    return folder


def remove_previous_results(folder: Path, names: Sequence[str]) -> None:
    """With ``--overwrite``: delete what an earlier run wrote (only those names), so no stale file
    survives next to the new results."""
    for name in names:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
