"""Output folders that are built aside and swapped in whole, and `--overwrite` that deletes only our files.

A command that writes a folder builds it next to the target (same file system) and renames it
into place when complete, so an interruption never leaves a half-written output, and replacing an
earlier output is refused when that folder holds files the command did not write.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError


def partial_folder(target: Path) -> Path:
    """A fresh hidden folder next to `target` to build its replacement in (parents are created)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))


def swap_in(new: Path, target: Path) -> None:
    """Replace `target` (absent, empty or an earlier output) by the complete folder `new`."""
    if not target.exists():
        new.replace(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.replace(old)
    try:
        new.replace(target)
    except OSError:
        old.replace(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def files_under(folder: Path) -> list[Path]:
    """Every file (or link) under `folder`, relative to it, sorted."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if not p.is_dir() or p.is_symlink())


def check_replaceable(folder: Path, overwrite: bool, owned: Iterable[Path], parameter: str, command: str) -> None:
    """Allow writing `folder` only if it is absent or empty, or `overwrite` is set and every file in it is `owned`.

    `owned` lists the files (relative to `folder`) an earlier run of `command` wrote there, read from
    that run's own records, so `--overwrite` never deletes anything else.
    """
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise InputError(f"{parameter} {folder}: folder is not empty (pass `overwrite=True` to replace an earlier "
                         f"`{command}` output)")
    owned = set(owned)
    foreign = [p for p in files_under(folder) if p not in owned]
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(f"{parameter} {folder}: `overwrite` replaces only an earlier `{command}` output, but the "
                         f"folder holds other files ({shown}); move them or choose another folder")
