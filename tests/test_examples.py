"""The examples run from the repository root with a small step count and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["plain_pytorch_loop.py", "anomalib_draem_style.py"]


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
    assert len(losses) == 3 and all(loss == loss and loss >= 0 for loss in losses)


def test_example_specific_output(example_output):
    name, out = example_output
    if name == "plain_pytorch_loop.py":
        auroc = float(out.split("pixel AUROC on 23 real test photos:")[1].split()[0])
        assert 0.0 <= auroc <= 1.0
    else:
        line = next(l for l in out.splitlines() if l.startswith("batch keys:"))
        for key, shape in (("'image'", "(4, 3, 32, 32)"), ("'augmented_image'", "(4, 3, 32, 32)"),
                           ("'anomaly_mask'", "(4, 1, 32, 32)"), ("'has_anomaly'", "(4, 1)")):
            assert f"{key}: {shape}" in line
