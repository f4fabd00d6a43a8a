"""Run plumbing shared by the trainers: run folders, atomic writes, logs, checkpoints and EMA.

Both `sia train` (SDAS diffusion) and `realnet train` keep a run in one folder that survives a kill
at any moment: every file is written to a temporary name and renamed into place, a checkpoint
folder only gets its final name once it is complete, and a log line torn by a kill is dropped on
resume. Checkpoints hold nothing but safetensors and JSON, so resuming never unpickles anything: a
tampered file is refused with one line, it cannot run code.

Checkpoint layout (one scheme for both trainers):

    checkpoints/step_XXXXXX/
        model.safetensors        the weights being trained (the unwrapped model's state dict)
        <name>.safetensors       every other state object (optimizer, lr scheduler, EMA, grad scaler):
                                 its tensors, plus its structure as JSON in the safetensors metadata
        rng_state_<rank>.safetensors   each process's python / numpy / torch random states
        trainer_state.json       {"step", "num_processes", ...}; written last, marks the folder complete
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, read_json_object
from .paths import separate_output, writable_folder_path

CHECKPOINT_DIR = "checkpoints"
# In a run folder: the top-level entries the run writes, recorded before it writes them, so that
# `--overwrite` deletes those and nothing the user put next to them.
RUN_OUTPUTS = ".run-outputs.json"
CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
MIXED_PRECISION_MODES = ("no", "fp16", "bf16")
STATE_FORMAT = "sia-state-1"

# ---------------------------------------------------------------------------------------------
# atomic writes


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path` to write into; renamed to `path` only if the block succeeds.

    Whatever writes the file (PIL, safetensors, json) never leaves a half-written `path` behind.
    The temporary name keeps the suffix so writers that pick a format from it still do.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """`data` as indented JSON in `path`, replacing it only once fully written."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """A temporary folder to fill; swapped in for `folder` (replacing it whole) if the block succeeds."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# logs


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON record as a line (a kill can only tear this last line; `trim_log` drops it)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(dict(record)) + "\n")


def _record_position(line: str, key: str) -> int | None:
    """The `key` (step or iteration) of one log line, or None for a line that is not a complete record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def trim_log(path: str | Path, last: int, key: str = "step") -> None:
    """Keep the records of a JSONL log up to `last` (the checkpoint a run resumes from).

    Records after it will be written again by the resumed run; lines that do not parse as a record
    with an integer `key` (the line a kill tore in half, blank lines) are dropped too.
    """
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in path.read_text(errors="replace").splitlines()
            if (position := _record_position(line, key)) is not None and position <= last]
    tmp = _temporary_sibling(path)
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# run folders


@dataclass(frozen=True)
class RunLayout:
    """What a trainer writes at the top of its output folder.

    `record` is the run's settings file, `outputs` everything the trainer writes there (all that
    `--overwrite` may delete) and `results` the part of it worth keeping: checkpoints and final
    models. A folder with a record but no results is a run that stopped before its first
    checkpoint; a new run may take it over, since nothing in it would be lost.
    """

    record: str
    outputs: tuple[str, ...]
    results: tuple[str, ...]

    def present(self, folder: Path, names: Iterable[str]) -> list[str]:
        return [name for name in names if (folder / name).exists() or (folder / name).is_symlink()]


def open_run_folder(folder: str | Path, layout: RunLayout, *, resume: bool, overwrite: bool,
                    inputs: Iterable[str | Path | None] = ()) -> dict[str, Any] | None:
    """Check an output folder against `resume` / `overwrite` before anything is written.

    Returns the stored run record when resuming, else None. Refuses (one-line InputError) to
    resume where there is no run, and to start over a run that holds results unless `overwrite`.
    Nothing is deleted here: a new run calls `clear_recorded_outputs` once its inputs are checked
    (that removes an overwritten run, or one that stopped before its first checkpoint). An output
    that equals, contains or lies inside one of `inputs` is refused, so clearing never deletes data.
    """
    folder = writable_folder_path(folder, "`output`")
    separate_output(folder, inputs, "`output`")
    if resume and overwrite:
        raise InputError("`resume` and `overwrite`: give one of them, not both")
    record = folder / layout.record
    if resume:
        if not record.is_file():
            raise InputError(f"`resume` {folder}: there is no training run to resume there (no {layout.record}); "
                             "drop `resume` to start one")
        return read_json_object(record, "training run record", advice="fix or delete it")
    present = layout.present(folder, layout.outputs)
    stopped_before_first_checkpoint = record.is_file() and not layout.present(folder, layout.results)
    if overwrite or not present or stopped_before_first_checkpoint:
        return None
    if record.is_file():
        status = _status(record)
        hint = ("`overwrite=True` to start again" if status == "finished"
                else "`resume=True` to continue it or `overwrite=True` to start again")
        raise InputError(f"`output` {folder}: already holds a {status} training run ({', '.join(present)}); pass {hint}")
    raise InputError(f"`output` {folder}: holds {', '.join(present)} but no {layout.record} (not a training run "
                     "folder); pass `overwrite=True` or choose another folder")


def _recorded_names(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v and "\\" not in v for v in value)


def recorded_outputs(folder: str | Path) -> list[str]:
    """The top-level files and folders the last run recorded writing in `folder` (none without a record).

    Entries must be plain names in `folder`: an edited record can never point `--overwrite` elsewhere.
    """
    path = Path(folder) / RUN_OUTPUTS
    if not path.is_file():
        return []
    entries = read_json_object(path, "list of a run's outputs").get("entries")
    if not _recorded_names(entries):
        raise InputError(f"{path}: entries must be a list of names in the run folder; fix it, or delete it "
                         "and the earlier run's files")
    return entries


def check_unrecorded_outputs(folder: str | Path, planned: Iterable[str], parameter: str = "--output") -> None:
    """Refuse a run that would write over an entry of `folder` no earlier run recorded writing
    (the user's own file or folder), before anything is deleted or written."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    ours = set(recorded_outputs(folder))
    foreign = [name for name in planned if name not in ours and os.path.lexists(folder / name)]
    if foreign:
        raise InputError(f"{parameter} {folder}: would replace {', '.join(foreign)}, which no recorded training "
                         f"run wrote there (your own files, or a run from before runs kept {RUN_OUTPUTS}); "
                         "move them or choose another folder")


def clear_recorded_outputs(folder: str | Path) -> None:
    """Delete what the last run recorded writing in `folder` (a file the user added there stays)."""
    folder = Path(folder)
    for name in recorded_outputs(folder):
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    (folder / RUN_OUTPUTS).unlink(missing_ok=True)


def record_run_outputs(folder: str | Path, planned: Iterable[str], command: str) -> None:
    """Record, before writing any of them, the top-level entries a new run will write in `folder`."""
    entries = sorted(set(planned))
    if not _recorded_names(entries):
        raise ValueError(f"run outputs must be plain names, got {entries!r}")
    write_json_atomic(Path(folder) / RUN_OUTPUTS, {"version": 1, "written_by": command, "entries": entries})


def _status(record: Path) -> str:
    """The status a run record states, for messages only (a damaged record reads as 'unfinished')."""
    try:
        status = json.loads(record.read_text()).get("status")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        status = None
    return status if status in ("running", "finished") else "unfinished"


def check_mixed_precision(mode: str, cpu: bool) -> None:
    """One rule for both trainers: a known mode, and fp16 (which needs a GPU grad scaler) not with `cpu`."""
    if mode not in MIXED_PRECISION_MODES:
        raise InputError(f"`mixed_precision`: expected one of {', '.join(MIXED_PRECISION_MODES)}, got {mode!r}")
    if mode == "fp16" and cpu:
        raise InputError("`mixed_precision='fp16'`: needs a GPU; use bf16 or no with `cpu=True`")


def make_accelerator(mixed_precision: str, cpu: bool, **kwargs: Any):
    """An `accelerate.Accelerator`, with the precision rule checked and its refusals as one-line errors."""
    from accelerate import Accelerator

    check_mixed_precision(mixed_precision, cpu)
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu, **kwargs)
    except ValueError as err:  # e.g. fp16 on a machine without a GPU
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"`mixed_precision` {mixed_precision}: {first}") from None


# ---------------------------------------------------------------------------------------------
# safe state files: tensors in safetensors, the rest of the structure as JSON in its metadata


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able form of a state tree; tensors go to `tensors`, named by their path in the tree
    (a model's state dict keeps its own keys), and are referenced by that name."""
    if isinstance(value, torch.Tensor):
        name = path or "tensor"
        while name in tensors:
            name += "'"
        tensors[name] = value
        return {"__tensor__": name}
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
        as_tensor = torch.from_numpy(value.astype("int64") if value.dtype.kind in "ui" else value)
        return {"__ndarray__": _encode(as_tensor, tensors, path)["__tensor__"], "dtype": str(value.dtype)}
    child = (lambda key: f"{path}/{key}" if path else str(key))
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, child(i)) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, child(i)) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, child(k)) for k, v in value.items()}
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors, child(k))] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (only tensors, numbers, strings and containers)")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(value["dtype"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__dict__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no shared storage (safetensors refuses aliased tensors)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if pointer is not None and pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        out[name] = tensor
    return out


def save_state(path: str | Path, state: Any) -> None:
    """Write a state tree (a `state_dict()` of anything) to one safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(state, tensors))
    with atomic_path(path) as tmp:
        save_file(_storable(tensors), str(tmp), metadata={"format": STATE_FORMAT, "structure": structure})


def load_state(path: str | Path) -> Any:
    """Read a state tree written by `save_state`; anything else is a one-line InputError naming the file.

    Only safetensors and JSON are parsed, so a tampered file cannot run code.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing; the checkpoint is incomplete or from an older version, "
                         "resume from another one or start again with `overwrite=True`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
        if metadata.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} file")
        return _decode(json.loads(metadata["structure"]), tensors)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{path}: not a valid checkpoint file ({reason}); delete that checkpoint or start "
                         "again with `overwrite=True`") from None


# ---------------------------------------------------------------------------------------------
# random states


def random_state() -> dict[str, Any]:
    """The global python, numpy and torch (CPU and CUDA) random states of this process."""
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: Mapping[str, Any]) -> None:
    import numpy as np

    try:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"checkpoint random state: not usable ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_step(folder: Path) -> int | None:
    """Step of a complete checkpoint folder (named step_N, with trainer_state.json), else None."""
    if not folder.name.startswith(CHECKPOINT_PREFIX) or not (folder / TRAINER_STATE).is_file():
        return None
    digits = folder.name[len(CHECKPOINT_PREFIX):]
    return int(digits) if digits.isdigit() else None


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `run_dir/checkpoints`, if any."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resumable_checkpoint(run_dir: str | Path, num_processes: int) -> Path | None:
    """The latest complete checkpoint of a run, checked to fit this launch's number of processes.

    Checkpoints in accelerate's pickle format (from earlier versions) are refused rather than
    ignored: resuming would silently start the run again from scratch.
    """
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        check_same_processes(checkpoint, read_json_object(checkpoint / TRAINER_STATE, "trainer state", advice="fix or delete it"), num_processes)
        return checkpoint
    root = Path(run_dir) / CHECKPOINT_DIR
    legacy = sorted(p.name for p in root.glob("*/optimizer.bin")) if root.is_dir() else []
    if legacy:
        raise InputError(f"`resume` {run_dir}: {root} holds only checkpoints in an older, pickled format "
                         f"({len(legacy)}), which are never loaded; start again with `overwrite=True`")
    return None


def save_checkpoint(accelerator, run_dir: str | Path, step: int, model: torch.nn.Module,
                    objects: Mapping[str, Any], keep: int, extra: Mapping[str, Any] | None = None) -> Path:
    """Save a resumable state as `checkpoints/step_XXXXXX`, complete or not at all; keep the last `keep`.

    `objects` maps file names to anything with `state_dict()` (optimizer, scheduler, EMA, ...);
    `extra` goes into trainer_state.json next to the step and the number of processes.
    Call it on every process: each one saves its random state.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".tmp_{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state(tmp / f"rng_state_{accelerator.process_index}.safetensors", random_state())
    if accelerator.is_main_process:
        save_state(tmp / "model.safetensors", accelerator.unwrap_model(model).state_dict())
        for name, obj in objects.items():
            if obj is not None:
                save_state(tmp / f"{name}.safetensors", obj.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / TRAINER_STATE, {"step": step, "num_processes": accelerator.num_processes, **(extra or {})})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for stale in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: str | Path, model: torch.nn.Module, objects: Mapping[str, Any]) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote (weights, `objects`, this process's random state).

    Returns trainer_state.json. A checkpoint from another number of processes is refused: the
    data order and the global batch depend on it.
    """
    folder = Path(folder)
    trainer_state = read_json_object(folder / TRAINER_STATE, "trainer state", advice="fix or delete it")
    check_same_processes(folder, trainer_state, accelerator.num_processes)
    try:
        accelerator.unwrap_model(model).load_state_dict(load_state(folder / "model.safetensors"))
        for name, obj in objects.items():
            if obj is not None:
                obj.load_state_dict(load_state(folder / f"{name}.safetensors"))
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        if isinstance(err, InputError):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{folder}: does not fit this run ({first})") from None
    set_random_state(load_state(folder / f"rng_state_{accelerator.process_index}.safetensors"))
    return trainer_state


def check_same_processes(folder: Path, trainer_state: Mapping[str, Any], num_processes: int) -> None:
    stored = trainer_state.get("num_processes")
    if stored is not None and stored != num_processes:
        raise InputError(f"`resume` {folder.parent.parent}: checkpoint {folder.name} was trained with {stored} processes "
                         f"but this launch has {num_processes}; relaunch with {stored} (global batch and data order "
                         "depend on it) or start a new run")


# ---------------------------------------------------------------------------------------------
# EMA


class ExponentialMovingAverage:
    """Exponential moving average of chosen state-dict entries of a model.

    `averaged` keys (floating point) follow `shadow <- decay * shadow + (1 - decay) * value` after
    each update; `copied` keys take the model's value as is (e.g. buffers a module recomputes).
    With `warmup`, the decay of update n is min(decay, (1 + n) / (10 + n)), so early averages are
    not dominated by the random initialisation. `shadow` may be given to average into existing
    tensors (the state dict of a model copy, which then holds the averaged weights itself).
    """

    def __init__(self, model: torch.nn.Module, decay: float, averaged: Iterable[str] | None = None,
                 copied: Iterable[str] = (), warmup: bool = False,
                 shadow: Mapping[str, torch.Tensor] | None = None) -> None:
        state = model.state_dict()
        averaged = set(state) if averaged is None else set(averaged)
        self.averaged = [k for k in state if k in averaged and state[k].dtype.is_floating_point]
        self.copied = [k for k in state if k in set(copied) and k not in self.averaged]
        source = state if shadow is None else shadow
        self.shadow = {k: source[k] if shadow is not None else state[k].detach().clone()
                       for k in self.averaged + self.copied}
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        state = model.state_dict()
        if self.averaged:
            targets = [self.shadow[k] for k in self.averaged]
            values = [state[k].detach().to(t.dtype) for k, t in zip(self.averaged, targets)]
            torch._foreach_lerp_(targets, values, 1.0 - self.current_decay())
        for key in self.copied:
            self.shadow[key].copy_(state[key])

    @contextlib.contextmanager
    def applied_to(self, model: torch.nn.Module):
        """Temporarily load the averaged weights into `model`."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(backup, strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shadow = state.get("shadow") if isinstance(state, Mapping) else None
        if not isinstance(shadow, Mapping):
            raise InputError("checkpoint EMA state: has no averaged weights")
        missing = sorted(set(self.shadow) - set(shadow))
        if missing:
            raise InputError(f"checkpoint EMA state: lacks {', '.join(missing[:3])}; it belongs to another model")
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        with torch.no_grad():
            for key, tensor in self.shadow.items():
                tensor.copy_(shadow[key])


__all__ = [
    "CHECKPOINT_DIR", "CHECKPOINT_PREFIX", "MIXED_PRECISION_MODES", "RUN_OUTPUTS", "TRAINER_STATE",
    "ExponentialMovingAverage", "RunLayout", "append_jsonl", "atomic_folder", "atomic_path", "check_mixed_precision",
    "check_unrecorded_outputs", "checkpoint_step", "clear_recorded_outputs", "complete_checkpoints",
    "latest_checkpoint", "load_checkpoint", "load_state", "make_accelerator", "open_run_folder", "read_json_object",
    "record_run_outputs", "recorded_outputs", "resumable_checkpoint", "save_checkpoint", "save_state", "trim_log",
    "write_json_atomic",
]
