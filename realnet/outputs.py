"""Output folders of ``eval`` and ``predict``: never mix runs, and delete only what a run wrote.

Torch-free, so a deployed (exported) model can use the same rules.

`realnet eval` and `realnet predict` write into a folder the user names, which may also hold the
user's own files (a `masks/` folder of ground truth, notes). Before writing anything, a run records
every file it is going to write in a manifest in that folder (written atomically). `--overwrite`
then deletes exactly the files the previous manifest lists, and the folders that run created if
they are left empty, never a folder by name. A file of someone else's that a new run would
replace is refused, not overwritten.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from sia.errors import InputError, read_json_object
from sia.paths import inside, writable_folder_path

MANIFEST = ".realnet-outputs.json"
_MANIFEST_VERSION = 1


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"`batch_size`: expected a positive integer, got {batch_size!r}")
    return batch_size


def finite_threshold(value: Optional[float], parameter: str) -> Optional[float]:
    """``value`` as a float if it is None or a finite number: NaN would flag nothing, inf everything."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{parameter}: expected a finite number, got {value!r}")
    return float(value)


def check_output_folder(folder: str | Path, overwrite: bool, parameter: str = "`out`") -> Path:
    """Refuse an output that is a file, or a non-empty folder unless ``overwrite``: the results of an
    earlier run are never replaced (or mixed with new ones) silently."""
    folder = writable_folder_path(folder, parameter)
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise InputError(
            f"{parameter} {folder}: folder is not empty; pass `overwrite=True` to replace its results or choose another folder"
        )
    return folder


def read_manifest(folder: str | Path) -> dict[str, list[str]]:
    """The files and folders an earlier run recorded in ``folder`` (empty lists without a manifest).

    Every entry must stay inside ``folder``: an edited manifest can never make `--overwrite` delete
    anything outside it.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return {"files": [], "folders": []}
    record = read_json_object(path, "list of earlier results (delete it to keep every file)")
    entries: dict[str, list[str]] = {}
    for key in ("files", "folders"):
        values = record.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise InputError(f"{path}: {key} must be a list of relative paths; delete it to keep every file")
        for value in values:
            inside(folder, value, f"{path} entry")
        entries[key] = values
    return entries


def check_planned_outputs(folder: str | Path, planned: Iterable[str], overwrite: bool,
                          parameter: str = "`out`") -> tuple[Path, dict[str, list[str]]]:
    """Everything :func:`prepare_output_folder` refuses, checked without touching the folder:
    (folder, the previous run's manifest)."""
    folder = check_output_folder(folder, overwrite, parameter)
    planned = list(planned)
    for name in planned:
        inside(folder, name, parameter)
    previous = read_manifest(folder) if folder.is_dir() else {"files": [], "folders": []}
    ours = set(previous["files"])
    foreign = [name for name in planned if name not in ours and os.path.lexists(folder / name)]
    if foreign:
        listing = ", ".join(foreign[:3]) + (f" ... ({len(foreign)} in all)" if len(foreign) > 3 else "")
        raise InputError(f"{parameter} {folder}: would replace {listing}, which no realnet run wrote there; "
                         "move it or choose another folder")
    return folder, previous


def prepare_output_folder(folder: str | Path, planned: Iterable[str], command: str, overwrite: bool,
                          parameter: str = "`out`") -> Path:
    """Make ``folder`` ready for a run that writes the ``planned`` files (paths relative to it).

    With ``overwrite`` the files of the previous run (its manifest) are deleted first; a planned
    file that exists but no run of this project wrote is refused. Then the folders the planned
    files need are created and the new manifest is written, before any result.
    """
    planned = sorted(set(planned))
    folder, previous = check_planned_outputs(folder, planned, overwrite, parameter)
    for name in previous["files"]:
        target = folder / name
        if target.is_symlink() or target.is_file():
            target.unlink()
    for name in sorted(previous["folders"], key=lambda n: len(Path(n).parts), reverse=True):
        target = folder / name
        if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
            target.rmdir()
    folder.mkdir(parents=True, exist_ok=True)
    created: list[str] = []
    for parent in sorted({Path(name).parent for name in planned} - {Path(".")}, key=lambda p: len(p.parts)):
        for level in reversed([parent, *parent.parents][:-1]):
            if not (folder / level).is_dir():
                (folder / level).mkdir()
                created.append(level.as_posix())
    record = {"version": _MANIFEST_VERSION, "written_by": command, "files": planned, "folders": created}
    tmp = folder / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return folder
