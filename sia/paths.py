"""Path safety for everything that writes: names that become paths, outputs that must not swallow inputs.

Every name a user (or a file a user hands us) supplies that becomes part of a path goes through
`path_component`, and every path built under an output root goes through `inside`, so nothing is
ever written, embedded or deleted outside the folder the user named.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError


def path_component(name: object, parameter: str) -> str:
    """`name` if it is one plain path component (no separator, not '.', '..', empty or absolute)."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{parameter} must be a non-empty name, got {name!r}")
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if name in {".", ".."} or any(sep in name for sep in separators) or "\0" in name:
        raise InputError(f"{parameter} must be a plain name (no '/', '\\' or '..'), got {name!r}")
    return name


def inside(root: str | Path, relative: str | Path, parameter: str) -> Path:
    """`root / relative`, resolved, if it stays inside `root`; else an InputError naming `parameter`."""
    root_resolved = Path(root).resolve()
    relative = Path(relative)
    if relative.is_absolute():
        raise InputError(f"{parameter} must be a path relative to {root}, got the absolute path {relative}")
    target = (root_resolved / relative).resolve()
    if target != root_resolved and root_resolved not in target.parents:
        raise InputError(f"{parameter} {str(relative)!r} points outside {root}")
    return target


def separate_output(output: str | Path, inputs: Iterable[str | Path | None], parameter: str) -> Path:
    """`output`, resolved, if it neither equals, contains nor lies inside any of `inputs`.

    Commands that may `--overwrite` (delete) their output call this first, so an output that is
    the source, one of its parents or a folder inside it is refused before anything is touched.
    """
    output_resolved = Path(output).resolve()
    for source in inputs:
        if source is None:
            continue
        source_resolved = Path(source).resolve()
        if (
            output_resolved == source_resolved
            or output_resolved in source_resolved.parents
            or source_resolved in output_resolved.parents
        ):
            raise InputError(
                f"{parameter} {output} overlaps the input {source}: choose an output folder that "
                "neither contains nor lies inside any input"
            )
    return output_resolved


def writable_file_path(path: str | Path, parameter: str) -> Path:
    """`path` if a file can be written there: not an existing folder, no existing file among its parents."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{parameter} {path} is a folder; expected a file path")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"{parameter} {path}: {parent} is a file, not a folder")
    return path


def writable_folder_path(path: str | Path, parameter: str) -> Path:
    """`path` if a folder can be made there: not an existing file, no existing file among its parents."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{parameter} {path} is a file; expected a folder")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"{parameter} {path}: {parent} is a file, not a folder")
    return path
