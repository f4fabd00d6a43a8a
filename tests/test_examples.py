"""The examples run from the repository root with a small step count and print what they promise."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["plain_pytorch_loop.py"]


@pytest.fixture(scope="module", params=EXAMPLES)
def example_output(request) -> tuple[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(Path("examples") / request.param), "--steps", "3", "--size", "32", "--batch-size", "4"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return request.param, result.stdout


def test_example_trains_a_few_steps(example_output):
    _, out = example_output
    losses = [float(line.split("loss")[1].split()[0]) for line in out.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


def test_example_specific_output(example_output):
    _, out = example_output
    auroc = float(out.split("pixel AUROC on 23 real test photos:")[1].split()[0])
    assert math.isfinite(auroc)  # NaN: the maps were degenerate (all NaN) or the masks held one class only


@pytest.mark.slow
def test_anomalib_example_trains_draem_with_sia_anomalies_in_anomalibs_engine():
    pytest.importorskip("anomalib")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(Path("examples") / "anomalib_engine.py"), "--steps", "2", "--size", "32", "--batch-size", "4"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model: Draem, generator: SiaAnomalyGenerator(" in result.stdout
    metrics = ast.literal_eval(result.stdout.split("test metrics:")[1].splitlines()[0].strip())
    assert math.isfinite(metrics["image_AUROC"]) and math.isfinite(metrics["pixel_AUROC"])
    assert "'anomaly_map': (8, 32, 32)" in result.stdout
