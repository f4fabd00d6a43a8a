"""RealNet training on two CPU processes (torchrun + gloo), as `accelerate launch --num_processes 2` runs it.

One launch trains the same tiny run three ways: straight through, interrupted after a checkpoint,
and resumed. It must finish (a wrong per-process epoch length used to make it spin forever), count
epochs per process, resume to the same weights, and give every process the main process's AFS
indices and feature statistics even when one process computed different ones.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training import make_dataset

TESTS = Path(__file__).resolve().parent
N_TRAIN, HOLDOUT, BATCH, EPOCHS = 12, 3, 4, 3

SCRIPT = """
import json, os, sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

sys.path.insert(0, {tests!r})
from test_training import TINY_MODEL
from realnet import training
from realnet.model import RealNet
from realnet.training import TrainingConfig, train

data, out = Path({data!r}), Path({out!r})
rank = int(os.environ["RANK"])


def config(name, **changes):
    settings = dict(data=str(data), output=str(out / name), source="cutpaste", categories=["widget"], recipe="fast",
                    backbone="resnet18", image_size=64, epochs={epochs}, batch_size={batch}, afs_batches=1,
                    model_kwargs=dict(TINY_MODEL), validation_fraction=0.25, checkpoint_every=0, progress=False,
                    cpu=True, log_every=1)
    settings.update(changes)
    return TrainingConfig(**settings)


original_select = RealNet.select_features


def select_then_disagree(self, *args, **kwargs):
    losses = original_select(self, *args, **kwargs)
    if rank == 1:  # as if this process had broken a tie differently: the broadcast must undo it
        sizes, channels = self.selector.sizes, self.backbone.channels
        self.selector.set_indices([torch.arange(c - k, c) for c, k in zip(channels, sizes)])
        self.standardizer.mean_0.add_(1.0)
        torch.save({{k: v.cpu().clone() for k, v in self.state_dict().items()
                    if k.startswith(("selector.", "standardizer."))}}, out / "rank1_before_broadcast.pt")
    return losses


original_fit = training._fit_statistics_and_select
current = {{"name": ""}}


def recording_fit(model, *args, **kwargs):
    original_fit(model, *args, **kwargs)
    torch.save({{k: v.cpu().clone() for k, v in model.state_dict().items()
                if k.startswith(("selector.", "standardizer."))}}, out / f"{{current['name']}}_rank{{rank}}.pt")


RealNet.select_features = select_then_disagree
training._fit_statistics_and_select = recording_fit
# The three runs share one process group: a second init_process_group in the same torchrun
# processes does not rendezvous again, so train()'s end_training must not destroy it.
Accelerator.end_training = lambda self: None


def reset():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


current["name"] = "straight"
train(config("straight"))
reset()


class Interrupt(Exception):
    pass


original_step = training._training_step
steps = {{"n": 0}}


def step_then_stop(*args, **kwargs):
    if steps["n"] == 5:  # every process stops at the same step, after the checkpoint of step 4
        raise Interrupt()
    steps["n"] += 1
    return original_step(*args, **kwargs)


current["name"] = "interrupted"
training._training_step = step_then_stop
try:
    train(config("resumed", checkpoint_every=4))
except Interrupt:
    pass
training._training_step = original_step
reset()
current["name"] = "resumed"
train(config("resumed", checkpoint_every=4, resume=True))
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_process_training_finishes_resumes_and_processes_agree(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    data = tmp_path / "data"
    make_dataset(data / "widget", n_train=N_TRAIN, n_good=1, n_bad=1)
    out = tmp_path / "runs"
    out.mkdir()
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(TESTS), data=str(data), out=str(out), epochs=EPOCHS,
                                                    batch=BATCH)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = launch.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: torchrun's workers run in their own sessions and only torchrun
        # itself stops them; a killed torchrun would leave them spinning.
        launch.terminate()
        launch.communicate(timeout=60)
        pytest.fail("two-process training did not finish within 300 s (a hang)")
    assert launch.returncode == 0, stderr[-3000:]

    # an epoch is one pass over the images split over both processes: ceil(ceil(9 / 2) / 2) = 3 steps
    per_epoch = math.ceil(math.ceil((N_TRAIN - HOLDOUT) / (BATCH // 2)) / 2)
    straight = out / "straight"
    run = json.loads((straight / "config.json").read_text())
    assert run["status"] == "finished" and run["num_processes"] == 2
    assert run["total_iterations"] == EPOCHS * per_epoch == 9
    log = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["epoch"]) for r in log] == [(i, (i - 1) // per_epoch) for i in range(1, 10)]
    assert (straight / "model" / "model.safetensors").is_file() and (straight / "model" / "README.md").is_file()

    # both processes hold the main process's AFS indices and statistics, which are the saved ones
    saved = load_file(str(straight / "model" / "model.safetensors"))
    for name in ("straight", "interrupted"):
        rank0, rank1 = torch.load(out / f"{name}_rank0.pt"), torch.load(out / f"{name}_rank1.pt")
        assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    before = torch.load(out / "rank1_before_broadcast.pt")
    assert not torch.equal(before["selector.indices_0"], rank0["selector.indices_0"])
    assert not torch.equal(before["standardizer.mean_0"], rank0["standardizer.mean_0"])
    straight_afs = torch.load(out / "straight_rank0.pt")
    assert all(torch.equal(saved[k], straight_afs[k]) for k in straight_afs if k in saved)

    # the interrupted run resumed from step 4 (mid-epoch 1) to the same weights, log without duplicates
    assert not (out / "resumed_rank0.pt").exists()  # resuming restores AFS from the checkpoint
    resumed_log = [json.loads(line) for line in (out / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in resumed_log] == list(range(1, 10))
    resumed = load_file(str(out / "resumed" / "model" / "model.safetensors"))
    assert resumed.keys() == saved.keys()
    for key in saved:
        assert torch.allclose(saved[key].float(), resumed[key].float(), atol=1e-5), key
