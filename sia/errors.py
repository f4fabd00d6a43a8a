"""One exception type for bad user input, so CLIs can print it as a single line.

Library messages name Python parameters in backticks (```num_images` must be at least 1``,
``pass `overwrite=True```); a command line shows the same message with its own flags in their
place (``--num-images``, ``--overwrite``), so neither audience reads the other's spelling.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping

# `name` or `name=value`: a parameter reference in a library message.
_PARAMETER_REFERENCE = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`]*))?`")


class InputError(ValueError):
    """Raised when a file, folder or argument given by the user is not what was expected.

    The message always names the offending file or parameter and says what was expected.
    """

    @property
    def parameter(self) -> str | None:
        """The first parameter the message names (in backticks), e.g. ``"num_images"``; None if it names none."""
        found = _PARAMETER_REFERENCE.search(str(self))
        return found.group(1) if found else None


class MissingExtraError(InputError, ImportError):
    """An optional extra is not installed; the message names the ``pip install`` command that adds it."""


def with_flags(message: str, flags: Mapping[str, str], off_flags: Mapping[str, str] | None = None) -> str:
    """``message`` with each backticked parameter that ``flags`` maps replaced by its flag.

    ```name``` becomes the flag, ```name=True``` the flag alone (``off_flags`` gives ``--no-...``
    for ```name=False```), ```name=value``` the flag and the value; other references stay as they are.
    """
    off_flags = off_flags or {}

    def replace(found: re.Match) -> str:
        name, value = found.groups()
        if name not in flags:
            return found.group(0)
        if value is None or value == "True":
            return flags[name]
        if value == "False" and name in off_flags:
            return off_flags[name]
        return f"{flags[name]} {value.strip(chr(39) + chr(34))}"

    return _PARAMETER_REFERENCE.sub(replace, message)


def command_flags(command) -> tuple[dict[str, str], dict[str, str]]:
    """(parameter -> flag, parameter -> negative flag) of a typer command function: the ``--long``
    name each option declares (typer's ``--name-with-dashes`` when it declares none; a bool gets
    ``--no-...``), and the upper-case name of each argument."""
    import inspect
    import typing

    from typer.models import ArgumentInfo, OptionInfo

    hints = typing.get_type_hints(command, include_extras=True)
    flags, off_flags = {}, {}
    for name, param in inspect.signature(command).parameters.items():
        hint = hints.get(name)
        infos = [m for m in (*getattr(hint, "__metadata__", ()), param.default) if isinstance(m, (OptionInfo, ArgumentInfo))]
        info = infos[0] if infos else None
        if isinstance(info, ArgumentInfo) or (info is None and param.default is inspect.Parameter.empty):
            flags[name] = name.upper()
            continue
        decls = (*([info.default] if isinstance(info.default, str) and info.default.startswith("-") else []),
                 *(info.param_decls or ())) if info else ()  # Annotated[..., Option("--x")] keeps "--x" as its default
        declared = [d for decl in decls for d in decl.split("/")]
        long = [d for d in declared if d.startswith("--")]
        flags[name] = long[0] if long else (declared or [f"--{name.replace('_', '-')}"])[0]
        if len(long) > 1:
            off_flags[name] = long[1]
        elif not declared and bool in (hint, *typing.get_args(hint)[:1]):
            off_flags[name] = f"--no-{name.replace('_', '-')}"
    return flags, off_flags


def report_input_errors(command=None, *, flags: Mapping[str, str] | None = None):
    """Decorate a CLI command so an InputError prints as one line on stderr and exits with code 2.

    The library's parameter names in the message (and in warnings logged by `sia` / `realnet`) are
    shown as the command's flags: its own parameters map to their options, ``flags`` adds library
    parameters the command spells differently (e.g. ``{"max_steps": "--steps"}``).
    """
    if command is None:
        return lambda command: report_input_errors(command, flags=flags)
    import functools

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import typer

        known, off_flags = command_flags(command)
        known.update(flags or {})
        try:
            with _logged_with_flags(known, off_flags):
                return command(*args, **kwargs)
        except InputError as err:
            typer.echo(f"Error: {with_flags(str(err), known, off_flags)}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


class _logged_with_flags:
    """While active, log records of the ``sia`` and ``realnet`` loggers name flags, not parameters."""

    def __init__(self, flags: Mapping[str, str], off_flags: Mapping[str, str]) -> None:
        self.flags, self.off_flags = flags, off_flags

    def __enter__(self) -> None:
        import logging

        self.previous = previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs):
            record = previous(*args, **kwargs)
            if record.name.split(".")[0] in ("sia", "realnet") and isinstance(record.msg, str):
                record.msg = with_flags(record.msg, self.flags, self.off_flags)
            return record

        logging.setLogRecordFactory(factory)

    def __exit__(self, *exc) -> None:
        import logging

        logging.setLogRecordFactory(self.previous)


def whole_number(value: object, name: str, minimum: int = 1) -> int:
    """`value` as an int (python or numpy integer; not a bool or float) >= `minimum`, else an InputError
    naming the parameter `name`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise InputError(f"`{name}` must be a whole number, got {value!r}") from None
    if number < minimum:
        raise InputError(f"`{name}` must be at least {minimum}, got {number}")
    return number


def read_json_object(path, what: str = "JSON file", advice: str | None = None) -> dict:
    """The JSON object in the file ``path``; a missing, unreadable, invalid or non-object file is a
    one-line InputError naming it (``what`` says what the file should have been, ``advice`` what to do).

    Torch-free on purpose: the exported-model path reads its manifest and thresholds with it."""
    import json
    from pathlib import Path

    hint = f"; {advice}" if advice else ""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing (expected a {what}){hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable {what} ({type(err).__name__}: {err}){hint}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a valid {what} (expected a JSON object, got {type(data).__name__}){hint}")
    return data
