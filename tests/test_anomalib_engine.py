"""Real anomalib Engine runs: DRAEM with sia's generator swapped in fits, tests and predicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("anomalib")

from anomalib.callbacks import ModelCheckpoint
from anomalib.data import Folder
from anomalib.engine import Engine
from anomalib.models import Draem

from sia.anomalib import SiaAnomalyGenerator, use_sia

SIZE = 32


def write_toy_dataset(root, size=SIZE, seed=0):
    """Grey tiles; test anomalies are bright squares with their masks (anomalib's Folder layout)."""
    rng = np.random.default_rng(seed)

    def tile():
        return np.clip(120 + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)

    for sub in ("train/good", "test/good", "test/bad", "ground_truth/bad", "textures"):
        (root / sub).mkdir(parents=True)
    for i in range(8):
        Image.fromarray(tile()).save(root / "train" / "good" / f"{i}.png")
    for i in range(3):
        Image.fromarray(tile()).save(root / "test" / "good" / f"{i}.png")
        image, mask = tile(), np.zeros((size, size), np.uint8)
        mask[8 + i : 18 + i, 6:16] = 255
        image[mask > 0] = 250
        Image.fromarray(image).save(root / "test" / "bad" / f"{i}.png")
        Image.fromarray(mask).save(root / "ground_truth" / "bad" / f"{i}.png")
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "textures" / f"{i}.png")
    return root


def toy_folder(root) -> Folder:
    return Folder(
        name="toy", root=root, normal_dir="train/good", abnormal_dir="test/bad", normal_test_dir="test/good",
        mask_dir="ground_truth/bad", train_batch_size=4, eval_batch_size=6, num_workers=0, seed=0,
    )


def cpu_engine(tmp_path, steps=2) -> Engine:
    """A CPU engine that writes no checkpoint (anomalib always adds a ModelCheckpoint; this one keeps none)."""
    return Engine(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, default_root_dir=tmp_path / "results",
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "weights", save_top_k=0, save_last=False)],
    )


@pytest.mark.slow
def test_draem_with_the_sia_generator_fits_tests_and_predicts(tmp_path):
    root = write_toy_dataset(tmp_path / "data")
    model = Draem(dtd_dir=str(root / "textures"), pre_processor=Draem.configure_pre_processor((SIZE, SIZE)), visualizer=False)
    use_sia(model, source=f"dtd:{root / 'textures'}", category="none", seed=0)
    calls = []
    model.augmenter.register_forward_hook(lambda module, args, output: calls.append(output[1].shape))
    before = {k: v.clone() for k, v in model.model.state_dict().items()}

    engine, datamodule = cpu_engine(tmp_path), toy_folder(root)
    engine.fit(model, datamodule=datamodule)
    assert isinstance(model.augmenter, SiaAnomalyGenerator)
    assert calls == [(4, 1, SIZE, SIZE), (4, 1, SIZE, SIZE)]  # DRAEM's training_step called it each step
    assert any(not torch.equal(before[k], v) for k, v in model.model.state_dict().items())

    (metrics,) = engine.test(model, datamodule=datamodule)
    for name in ("image_AUROC", "pixel_AUROC"):
        assert 0.0 <= metrics[name] <= 1.0
    predictions = engine.predict(model, datamodule=datamodule)
    assert predictions[0].anomaly_map.shape[-2:] == (SIZE, SIZE)
    assert sum(p.pred_score.numel() for p in predictions) == len(datamodule.test_data)
    assert not list(tmp_path.rglob("*.ckpt"))
