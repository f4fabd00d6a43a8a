"""RealNet inside anomalib: Engine.fit / test / predict run, AFS runs once, metrics agree with realnet.metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("anomalib")

from test_anomalib_engine import cpu_engine, toy_folder, write_toy_dataset

from realnet.anomalib import RealNetModule
from realnet.recipes import get_recipe
from realnet.metrics import image_auroc, pixel_auroc
from sia.errors import InputError

TINY = dict(
    backbone="resnet18", pre_trained=False, image_size=32, afs_batches=2,
    model_options=dict(layers=[1, 2], afs_channels=[8, 16], recon_channel_mult=[1, 2], recon_attention_mult=[2]),
)


@pytest.mark.slow
def test_realnet_fits_tests_and_predicts_in_anomalibs_engine(tmp_path, monkeypatch):
    torch.manual_seed(0)
    root = write_toy_dataset(tmp_path / "data")
    standardised = get_recipe("fast").replace(standardize_features=True)  # fits statistics before AFS too
    model = RealNetModule(source="cutpaste", category="none", seed=0, visualizer=False, recipe=standardised, **TINY)
    assert not model.network.afs_ready
    afs_calls = []
    select = model.network.select_features
    monkeypatch.setattr(model.network, "select_features", lambda *a, **k: afs_calls.append(1) or select(*a, **k))
    trainable = {k: v.clone() for k, v in model.network.recon.state_dict().items()}

    engine, datamodule = cpu_engine(tmp_path, steps=5), toy_folder(root)  # 8 images, batch 4: 3 epochs
    engine.fit(model, datamodule=datamodule)
    assert afs_calls == [1] and model.network.afs_ready  # once, at the start of fitting
    assert model.network.feature_statistics_ready  # fitted once, on the normal training images
    assert any(not torch.equal(trainable[k], v) for k, v in model.network.recon.state_dict().items())

    (metrics,) = engine.test(model, datamodule=datamodule)
    predictions = engine.predict(model, datamodule=datamodule)
    maps = torch.cat([p.anomaly_map for p in predictions]).numpy()
    scores = torch.cat([p.pred_score for p in predictions]).numpy()
    masks = torch.cat([p.gt_mask for p in predictions]).numpy()
    labels = torch.cat([p.gt_label for p in predictions]).numpy()
    assert maps.shape == (len(datamodule.test_data), 32, 32) and np.isfinite(maps).all()
    assert metrics["image_AUROC"] == pytest.approx(image_auroc(scores, labels), abs=1e-6)
    assert metrics["pixel_AUROC"] == pytest.approx(pixel_auroc(maps, masks), abs=1e-6)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(InputError, match="afs_batches"):
        RealNetModule(**{**TINY, "afs_batches": 0})
    with pytest.raises(InputError, match="no_such_setting"):
        RealNetModule(**{**TINY, "model_options": {"no_such_setting": 1}})
    with pytest.raises(InputError, match="recipe"):
        RealNetModule(**{**TINY, "recipe": "no-such-recipe"})
