"""Device names from the command line, checked against the machine before any work starts."""

from __future__ import annotations

import torch

from .errors import InputError


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """`device` as a `torch.device` this machine can use (None stays None); InputError naming `device` otherwise."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"`device` {device!r}: not a device name (expected e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "meta":  # tensors without data: every result would be garbage
        raise InputError(f"`device` {device}: the meta device holds no data; use cpu, cuda or mps")
    try:
        torch.empty(0, device=parsed)
    except Exception as err:  # noqa: BLE001 - no driver, not compiled in, bad ordinal: all mean "not here"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"`device` {device}: not available on this machine ({reason}); use `device='cpu'`") from None
    return parsed
