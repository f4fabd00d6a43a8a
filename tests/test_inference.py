"""realnet.inference.predict_batches: the same maps however the images are batched, mode restored."""

from __future__ import annotations

import pytest
import torch

from realnet.inference import predict_batches
from realnet.model import RealNet
from sia.errors import InputError

TINY = dict(backbone="resnet18", backbone_pretrained=False, afs_channels=[16, 24, 32, 16], image_size=64)


@pytest.fixture(scope="module")
def model() -> RealNet:
    torch.manual_seed(0)
    net = RealNet(**TINY)
    for unet in net.recon.unets:
        torch.nn.init.normal_(unet.out[-1].weight, std=0.05)
    net.selector.set_indices([torch.arange(16) * 4, torch.arange(24) * 5, torch.arange(32) * 8, torch.arange(16) * 32])
    return net


def test_tensor_and_batches_give_the_model_outputs_in_eval_mode(model):
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        expected = model(images)
    model.train()
    outputs = []
    whole = predict_batches(model, images, batch_size=2, on_batch=outputs.append)
    assert model.training and not model.backbone.model.training  # the caller's mode is back
    assert [o.image_score.shape[0] for o in outputs] == [2, 2, 1] and not outputs[0].anomaly_map.requires_grad
    chunks = predict_batches(model, [images[:3], images[3:]])
    for prediction in (whole, chunks):
        assert prediction.anomaly_map.shape == (5, 1, 64, 64) and prediction.anomaly_map.device.type == "cpu"
        torch.testing.assert_close(prediction.anomaly_map, expected.anomaly_map, rtol=0, atol=1e-6)
        torch.testing.assert_close(prediction.image_score, expected.image_score, rtol=0, atol=1e-6)


def test_dtype_of_the_results(model):
    images = torch.rand(2, 3, 64, 64)
    assert predict_batches(model, images).anomaly_map.dtype == torch.float32
    assert predict_batches(model, images, dtype=torch.float64).image_score.dtype == torch.float64
    assert predict_batches(model, images, dtype=None).anomaly_map.dtype == model.dtype


def test_no_images_is_an_input_error(model):
    with pytest.raises(InputError, match="test split: no images"):
        predict_batches(model, [], what="test split")
    with pytest.raises(InputError, match="images: no images"):
        predict_batches(model, torch.rand(0, 3, 64, 64))
