"""One exception type for bad user input, so CLIs can print it as a single line."""

import operator


class InputError(ValueError):
    """Raised when a file, folder or argument given by the user is not what was expected.

    The message always names the offending file or argument and says what was expected.
    """


class MissingExtraError(InputError, ImportError):
    """An optional extra is not installed; the message names the ``pip install`` command that adds it."""


def report_input_errors(command):
    """Decorate a CLI command so an InputError prints as one line on stderr and exits with code 2."""
    import functools

    import typer

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InputError as err:
            typer.echo(f"Error: {err}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def whole_number(value: object, name: str, minimum: int = 1) -> int:
    """`value` as an int (python or numpy integer; not a bool or float) >= `minimum`, else an InputError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be a whole number, got {value!r}") from None
    if number < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {number}")
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
