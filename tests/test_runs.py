"""The run plumbing both trainers share (`sia.runs`): atomic writes, kill-shaped logs, run folders,
checkpoints that never unpickle, and the EMA."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sia import runs
from sia.errors import InputError
from sia.runs import ExponentialMovingAverage, RunLayout

LAYOUT = RunLayout(record="config.json", outputs=("model", "checkpoints", "train_log.jsonl", "config.json"),
                   results=("model", "checkpoints"))


class _PlantsAFile:
    """Unpickling this creates a file: what a tampered checkpoint would do to a pickle loader."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "code ran"))


def _malicious_pickle(path: Path, target: Path) -> None:
    path.write_bytes(pickle.dumps(_PlantsAFile(target)))
    assert not target.exists()


@pytest.fixture
def accelerator(reset_accelerate):
    from accelerate import Accelerator

    yield Accelerator(cpu=True)
    reset_accelerate()


# ------------------------------------------------------------------ atomic writes and logs


def test_trim_log_drops_a_torn_last_line_and_records_after_the_checkpoint(tmp_path: Path):
    path = tmp_path / "train_log.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\nnot json\n[3]\n{"step": true}\n{"step": 3}\n{"step": 2, "lo')
    runs.trim_log(path, 2, key="step")
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'

    other = tmp_path / "realnet_log.jsonl"
    other.write_text('{"iteration": 1, "loss": 0.5}\n{"iteration": 2, "val_score": 0.7}\n{"iteration": 3}\n{"iter')
    runs.trim_log(other, 2, key="iteration")
    assert [json.loads(line)["iteration"] for line in other.read_text().splitlines()] == [1, 2]
    runs.trim_log(tmp_path / "missing.jsonl", 5)  # nothing to trim is not an error
    assert not (tmp_path / "missing.jsonl").exists()


def test_append_then_kill_then_trim_keeps_every_complete_record(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    for step in range(1, 4):
        runs.append_jsonl(path, {"step": step, "loss": 1.0 / step})
    with open(path, "a") as handle:
        handle.write('{"step": 4, "loss": 0.2')  # the kill came in the middle of this write
    runs.trim_log(path, 10)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_atomic_writes_leave_the_old_file_when_writing_fails(tmp_path: Path):
    target = tmp_path / "state.json"
    runs.write_json_atomic(target, {"a": 1})
    circular: list = []
    circular.append(circular)
    with pytest.raises(ValueError):
        runs.write_json_atomic(target, circular)
    assert json.loads(target.read_text()) == {"a": 1}

    picture = tmp_path / "grid.png"
    with pytest.raises(RuntimeError):
        with runs.atomic_path(picture) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not picture.exists() and list(tmp_path.iterdir()) == [target]

    folder = tmp_path / "pipeline"
    with runs.atomic_folder(folder) as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with runs.atomic_folder(folder) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("killed")
    assert [p.name for p in folder.iterdir()] == ["old.txt"]
    with runs.atomic_folder(folder) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["new.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline", "state.json"]  # no temporary left


@pytest.mark.parametrize("content, message", [("{", "not a readable"), ("[1, 2]", "expected a JSON object")])
def test_damaged_run_files_are_one_line_errors(tmp_path: Path, content: str, message: str):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        runs.read_json_object(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------ run folders


def test_resume_needs_a_run_and_a_readable_record(tmp_path: Path):
    for folder in (tmp_path / "new", tmp_path):  # missing, and existing but empty
        with pytest.raises(InputError, match="no training run to resume") as info:
            runs.open_run_folder(folder, LAYOUT, resume=True, overwrite=False)
        assert "\n" not in str(info.value)
    (tmp_path / "config.json").write_text('{"status": "runn')
    with pytest.raises(InputError, match="not a readable") as info:
        runs.open_run_folder(tmp_path, LAYOUT, resume=True, overwrite=False)
    assert "\n" not in str(info.value)
    (tmp_path / "config.json").write_text('{"status": "running"}')
    assert runs.open_run_folder(tmp_path, LAYOUT, resume=True, overwrite=False) == {"status": "running"}
    with pytest.raises(InputError, match="not both"):
        runs.open_run_folder(tmp_path, LAYOUT, resume=True, overwrite=True)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        runs.open_run_folder(afile, LAYOUT, resume=False, overwrite=False)


def test_a_run_with_results_is_never_replaced_silently(tmp_path: Path):
    (tmp_path / "checkpoints" / "step_000002").mkdir(parents=True)
    (tmp_path / "config.json").write_text('{"status": "running"}')
    with pytest.raises(InputError, match="running training run.*`resume=True` to continue it or `overwrite=True`"):
        runs.open_run_folder(tmp_path, LAYOUT, resume=False, overwrite=False)
    (tmp_path / "config.json").write_text("{broken")  # a damaged record still protects the run
    with pytest.raises(InputError, match="unfinished training run"):
        runs.open_run_folder(tmp_path, LAYOUT, resume=False, overwrite=False)
    (tmp_path / "config.json").unlink()
    with pytest.raises(InputError, match="not a training run folder"):
        runs.open_run_folder(tmp_path, LAYOUT, resume=False, overwrite=False)
    assert runs.open_run_folder(tmp_path, LAYOUT, resume=False, overwrite=True) is None
    assert (tmp_path / "checkpoints").is_dir()  # checking deletes nothing


def test_a_run_that_stopped_before_its_first_checkpoint_is_taken_over(tmp_path: Path):
    runs.record_run_outputs(tmp_path, ["config.json", "train_log.jsonl", "checkpoints"], "a trainer")
    (tmp_path / "config.json").write_text('{"status": "running"}')
    (tmp_path / "train_log.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "notes.txt").write_text("the user's own file")
    assert runs.open_run_folder(tmp_path, LAYOUT, resume=False, overwrite=False) is None
    runs.clear_recorded_outputs(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # only what the run recorded is deleted


def test_overwrite_deletes_only_the_recorded_outputs(tmp_path: Path):
    runs.record_run_outputs(tmp_path, ["model", "config.json", "model"], "a trainer")
    assert runs.recorded_outputs(tmp_path) == ["config.json", "model"]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_text("w")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("the user's")
    (tmp_path / "checkpoints").mkdir()
    runs.check_unrecorded_outputs(tmp_path, ["model", "config.json", "train_log.jsonl"])  # absent or recorded
    with pytest.raises(InputError, match="--output .*would replace checkpoints, which no recorded"):
        runs.check_unrecorded_outputs(tmp_path, ["model", "checkpoints"])
    runs.clear_recorded_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "notes.txt"]
    runs.clear_recorded_outputs(tmp_path)  # nothing recorded: nothing deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "notes.txt"]


@pytest.mark.parametrize("entries", [["../outside"], ["a/b"], [".."], "model", [1], None])
def test_an_edited_output_record_cannot_point_elsewhere(tmp_path: Path, entries):
    (tmp_path / runs.RUN_OUTPUTS).write_text(json.dumps({"version": 1, "entries": entries}))
    with pytest.raises(InputError, match="entries must be a list of names") as info:
        runs.clear_recorded_outputs(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError):
        runs.record_run_outputs(tmp_path, ["../outside"], "a trainer")


def test_one_mixed_precision_rule():
    runs.check_mixed_precision("bf16", cpu=True)
    runs.check_mixed_precision("fp16", cpu=False)
    with pytest.raises(InputError, match="`mixed_precision='fp16'`: needs a GPU"):
        runs.check_mixed_precision("fp16", cpu=True)
    with pytest.raises(InputError, match="expected one of no, fp16, bf16"):
        runs.check_mixed_precision("fp8", cpu=False)


# ------------------------------------------------------------------ safe state files


def test_state_files_round_trip_an_optimizer_and_random_states(tmp_path: Path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    for _ in range(2):
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    random.seed(3)
    np.random.seed(4)
    tree = {"optimizer": optimizer.state_dict(), "rng": runs.random_state(), "best": -float("inf"), "none": None}
    runs.save_state(tmp_path / "state.safetensors", tree)
    loaded = runs.load_state(tmp_path / "state.safetensors")
    assert loaded["best"] == -float("inf") and loaded["none"] is None
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.99)
    assert set(loaded["optimizer"]["state"]) == {0, 1}  # integer keys survive

    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    runs.set_random_state(loaded["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])

    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-3, betas=(0.8, 0.99))
    twin_optimizer.load_state_dict(loaded["optimizer"])
    batch = torch.randn(4, 3)
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        m(batch).square().sum().backward()
        opt.step()
    assert torch.equal(model.weight, twin.weight)


def test_a_tampered_state_file_is_refused_without_running_code(tmp_path: Path):
    planted = tmp_path / "planted.txt"
    state_file = tmp_path / "optimizer.safetensors"
    _malicious_pickle(state_file, planted)
    with pytest.raises(InputError, match="not a valid checkpoint file") as info:
        runs.load_state(state_file)
    assert not planted.exists() and "\n" not in str(info.value) and str(state_file) in str(info.value)

    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(state_file))  # valid safetensors, but not one of ours
    with pytest.raises(InputError, match="not a valid checkpoint file"):
        runs.load_state(state_file)
    with pytest.raises(InputError, match="missing"):
        runs.load_state(tmp_path / "nothing.safetensors")


# ------------------------------------------------------------------ checkpoints


def _trained_pair(accelerator):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ExponentialMovingAverage(model, 0.9, warmup=True)
    return model, optimizer, ema


def _step(model, optimizer, ema) -> None:
    model(torch.randn(5, 3)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    ema.update(model)


def test_checkpoints_rotate_ignore_incomplete_folders_and_restore_everything(tmp_path: Path, accelerator):
    model, optimizer, ema = _trained_pair(accelerator)
    for step in range(1, 4):
        _step(model, optimizer, ema)
        runs.save_checkpoint(accelerator, tmp_path, step, model, {"optimizer": optimizer, "ema": ema}, keep=2,
                             extra={"best": 0.5})
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000003"]
    (root / "step_000009").mkdir()  # a kill before trainer_state.json: not a checkpoint
    (root / ".tmp_step_000010").mkdir()
    latest = runs.latest_checkpoint(tmp_path)
    assert latest.name == "step_000003"
    assert json.loads((latest / "trainer_state.json").read_text()) == {"step": 3, "num_processes": 1, "best": 0.5}
    assert {p.suffix for p in latest.iterdir()} <= {".safetensors", ".json"}

    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_shadow = {k: v.clone() for k, v in ema.shadow.items()}
    after_save = torch.rand(3)
    for _ in range(2):
        _step(model, optimizer, ema)
    state = runs.load_checkpoint(accelerator, latest, model, {"optimizer": optimizer, "ema": ema})
    assert state["step"] == 3 and ema.updates == 3
    assert all(torch.equal(v, saved_weights[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, saved_shadow[k]) for k, v in ema.shadow.items())
    assert torch.equal(torch.rand(3), after_save)  # the random state of the checkpoint is back

    with pytest.raises(InputError, match="with 2 processes but this launch has 1"):
        runs.check_same_processes(latest, {"num_processes": 2}, 1)


def test_a_tampered_checkpoint_is_a_one_line_refusal(tmp_path: Path, accelerator):
    model, optimizer, ema = _trained_pair(accelerator)
    _step(model, optimizer, ema)
    folder = runs.save_checkpoint(accelerator, tmp_path, 1, model, {"optimizer": optimizer, "ema": ema}, keep=2)
    planted = tmp_path / "planted.txt"
    # the files accelerate's own checkpoints would hold are never read
    for name in ("optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl", "scheduler.bin"):
        _malicious_pickle(folder / name, planted)
    runs.load_checkpoint(accelerator, folder, model, {"optimizer": optimizer, "ema": ema})
    assert not planted.exists()
    for name in ("optimizer.safetensors", "ema.safetensors", "model.safetensors", "rng_state_0.safetensors"):
        original = (folder / name).read_bytes()
        _malicious_pickle(folder / name, planted)
        with pytest.raises(InputError, match=name) as info:
            runs.load_checkpoint(accelerator, folder, model, {"optimizer": optimizer, "ema": ema})
        assert "\n" not in str(info.value) and not planted.exists()
        (folder / name).write_bytes(original)


def test_only_pickled_checkpoints_of_an_older_version_are_refused_not_ignored(tmp_path: Path):
    legacy = tmp_path / "checkpoints" / "iteration_00000004"
    legacy.mkdir(parents=True)
    _malicious_pickle(legacy / "optimizer.bin", tmp_path / "planted.txt")
    (legacy / "complete").write_text("4")
    with pytest.raises(InputError, match="older, pickled format") as info:
        runs.resumable_checkpoint(tmp_path, 1)
    assert "\n" not in str(info.value) and not (tmp_path / "planted.txt").exists()
    assert runs.resumable_checkpoint(tmp_path / "fresh", 1) is None


def test_a_checkpoint_of_another_model_is_an_input_error(tmp_path: Path, accelerator):
    model, optimizer, ema = _trained_pair(accelerator)
    folder = runs.save_checkpoint(accelerator, tmp_path, 1, model, {"optimizer": optimizer}, keep=1)
    other = torch.nn.Linear(3, 7)
    with pytest.raises(InputError, match="does not fit this run") as info:
        runs.load_checkpoint(accelerator, folder, other, {})
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ EMA


def test_ema_warmup_averaged_and_copied_entries():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ExponentialMovingAverage(model, 0.99, averaged=["0.weight"], copied=["1.running_mean"], warmup=True)
    assert set(ema.shadow) == {"0.weight", "1.running_mean"}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(5.0)
    ema.update(model)
    decay = 2.0 / 11.0  # warm-up: (1 + n) / (10 + n) with n = 1
    torch.testing.assert_close(ema.shadow["0.weight"], decay * start["0.weight"] + (1 - decay) * model[0].weight)
    assert torch.equal(ema.shadow["1.running_mean"], torch.full((2,), 5.0))
    for _ in range(1000):
        ema.update(model)
    assert ema.current_decay() == 0.99

    with ema.applied_to(model):
        assert torch.equal(model[0].weight, ema.shadow["0.weight"])
    assert torch.equal(model[0].weight, start["0.weight"] + 1.0)

    fresh = ExponentialMovingAverage(model, 0.5, averaged=["0.weight"], copied=["1.running_mean"], warmup=True)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.updates == 1001 and fresh.decay == 0.99 and torch.equal(fresh.shadow["0.weight"], ema.shadow["0.weight"])
    with pytest.raises(InputError, match="lacks 0.weight"):
        fresh.load_state_dict({"decay": 0.9, "updates": 1, "shadow": {}})
