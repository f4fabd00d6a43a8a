"""``KEY=VALUE`` command-line options (``--recipe-option``, ``--model-option``) as a settings dict."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Optional

from sia.errors import InputError


def parse_key_values(items: Optional[Sequence[str]], what: str) -> dict:
    """``["a=1", "b=[1,2]", "c=adamw"]`` -> ``{"a": 1, "b": [1, 2], "c": "adamw"}`` (JSON values, else strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{what} {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value, parse_constant=_refuse_non_finite)
        except json.JSONDecodeError:
            out[key.strip()] = value
        except InputError as err:
            raise InputError(f"{what} {item!r}: {err}") from None
    return out


def _refuse_non_finite(constant: str) -> None:
    """JSON's NaN and Infinity: NaN passes every range check and inf breaks the optimiser."""
    raise InputError(f"{constant} is not allowed; expected a finite number")
