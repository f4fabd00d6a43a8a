"""Test-session settings: nothing in the suite may reach the network (the Hub paths are tested
against local folders and a Hub-shaped cache), whatever the caller's environment says; and the
fixtures that reset accelerate's process-wide state between runs in one process."""

import os
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def _reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def reset_accelerate():
    """The function that clears accelerate's process-wide singletons (AcceleratorState, GradientState).

    A real run gets them fresh in each process; a test that trains or builds an Accelerator more than
    once in this process calls it in between, so no run sees the device or precision of the last one."""
    return _reset_accelerate_state


@pytest.fixture
def fresh_accelerate(reset_accelerate):
    """A clean accelerate state before and after the test (modules opt in with ``usefixtures``);
    yields the reset function for tests that need it again in the middle."""
    reset_accelerate()
    yield reset_accelerate
    reset_accelerate()


_recorders: list[list[str]] = []


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _recorders and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        for recorder in _recorders:
            recorder.append(path)


@pytest.fixture
def opened_files():
    """Every path this process opens during the test (absolute): a Python audit hook sees each open
    of every library, wherever it imported its reader from."""
    if not getattr(_record_opens, "installed", False):
        sys.addaudithook(_record_opens)  # hooks cannot be removed; it records only while a test asks
        _record_opens.installed = True
    paths: list[str] = []
    _recorders.append(paths)
    yield paths
    _recorders.remove(paths)
