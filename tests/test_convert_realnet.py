"""Official RealNet checkpoints convert to `RealNet` with identical outputs (tiny resnet18 models)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from official_realnet import OfficialRealNet, randomize_
from realnet.convert import (
    convert_official_realnet,
    infer_realnet_config,
    official_to_realnet_state_dict,
    realnet_to_official_state_dict,
)
from sia.errors import InputError

SIZE = 64


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    model = randomize_(OfficialRealNet(), torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():  # moderate logits, so the anomaly map is not saturated at 0 or 1
        model.rrs.decoder3[2].weight.div_(10)
        model.rrs.decoder3[2].bias.div_(10)
    return model


def _images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def _save(tmp_path, official, name="ckpt_best.pth.tar", arch=None, state=None):
    path = tmp_path / name
    checkpoint = {"epoch": 995, "state_dict": state if state is not None else official.state_dict(), "best_metric": 0.987}
    if arch is not None:
        checkpoint["arch"] = arch
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    return convert_official_realnet(_save(tmp_path_factory.mktemp("ckpt"), official), image_size=SIZE)


def test_converted_model_matches_official_forward(official, converted):
    model = converted
    images = _images()
    with torch.no_grad():
        logits, expected = official(images)
        out = model(images)
    assert out.anomaly_map.shape == expected.shape == (3, 1, SIZE, SIZE)
    assert (out.logits - logits).abs().max().item() < 1e-4
    assert (out.anomaly_map - expected).abs().max().item() < 1e-5
    assert model.afs_ready
    # the maps are not trivially constant, so the comparison has teeth
    assert ((expected > 0.05) & (expected < 0.95)).float().mean().item() > 0.2


def test_round_trip_keys_and_values(official, converted):
    """official -> ours -> official gives back every tensor: zero missing or unexpected keys."""
    original = official.state_dict()
    back = realnet_to_official_state_dict(converted)
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


def test_config_inferred_from_shapes(official):
    config = infer_realnet_config(official.state_dict(), image_size=SIZE)
    assert config["backbone"] == "resnet18" and config["layers"] == [2, 3]
    assert config["afs_channels"] == [128, 128] and config["rrs_top_k"] == [32, 32]
    assert config["recon_channel_mult"] == [1, 2] and config["recon_num_res_blocks"] == 1
    assert config["recon_attention_mult"] == [2] and config["recon_width_ratio"] == 0.5


def test_easydict_arch_and_saved_folder(tmp_path, official, monkeypatch):
    """The released format pickles config.net as EasyDicts; RRS numbers then come from it."""
    fake = types.ModuleType("easydict")

    class EasyDict(dict):
        def __init__(self, d=None, **kw):
            super().__init__()
            for key, value in dict(d or {}, **kw).items():
                setattr(self, key, value)

        def __setattr__(self, name, value):
            if isinstance(value, dict) and not isinstance(value, EasyDict):
                value = EasyDict(value)
            elif isinstance(value, list):
                value = [EasyDict(v) if isinstance(v, dict) else v for v in value]
            super().__setattr__(name, value)
            super().__setitem__(name, value)

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    fake.EasyDict = EasyDict
    monkeypatch.setitem(sys.modules, "easydict", fake)
    arch = [EasyDict(name="backbone", type="models.backbones.Backbone", kwargs={"backbone": "resnet18", "outlayers": ["layer2", "layer3"]}),
            EasyDict(name="rrs", type="models.rrs.RRS", kwargs={"modes": ["max", "mean"], "mode_numbers": [32, 32]})]
    path = _save(tmp_path, official, arch=arch)
    monkeypatch.delitem(sys.modules, "easydict")

    from realnet.model import RealNet

    out_dir = tmp_path / "converted"
    model = convert_official_realnet(path, out_dir, image_size=SIZE,
                                     card_facts={"dataset": "mvtec-ad", "category": "bottle",
                                                 "metrics": {"image_auroc": 0.99}})
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file()
    card = (out_dir / "README.md").read_text(encoding="utf-8")
    assert "cc-by-nc-sa-4.0" in card and "ckpt_best.pth.tar (epoch 995)" in card and "image_auroc" in card
    reloaded = RealNet.from_pretrained(out_dir)
    images = _images(2)
    with torch.no_grad():
        assert torch.allclose(reloaded(images).anomaly_map, model(images).anomaly_map, atol=1e-6)
        assert torch.allclose(reloaded(images).anomaly_map, official(images)[1], atol=1e-5)
    with pytest.raises(InputError, match="not empty"):
        convert_official_realnet(path, out_dir, image_size=SIZE)


def test_bad_checkpoints_list_the_offending_keys(tmp_path, official):
    state = official.state_dict()
    broken = {k: v for k, v in state.items() if k != "recon.block2_recon.out.2.bias"}
    broken["rrs.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(InputError) as err:
        convert_official_realnet(_save(tmp_path, official, "broken.pth", state=broken), image_size=SIZE)
    message = str(err.value)
    assert "\n" not in message
    assert "missing keys (1): recon.block2_recon.out.2.bias" in message
    assert "unexpected keys (1): rrs.extra_head.weight" in message

    wrong = dict(state)
    wrong["rrs.decoder3.2.bias"] = torch.zeros(3)
    with pytest.raises(InputError, match=r"wrong shape keys \(1\): rrs.decoder3.2.bias"):
        convert_official_realnet(_save(tmp_path, official, "wrong.pth", state=wrong), image_size=SIZE)

    with pytest.raises(InputError, match="not an official RealNet state dict"):
        official_to_realnet_state_dict({"encoder.weight": torch.zeros(1)})
    no_afs = {k: v for k, v in state.items() if not k.startswith("afs.")}
    with pytest.raises(InputError, match="no AFS indices"):
        convert_official_realnet(_save(tmp_path, official, "noafs.pth", state=no_afs), image_size=SIZE)


def test_32_channel_layers_reproduce_every_official_tensor(tmp_path):
    """64 selected channels at hide ratio 0.5 give 32-wide U-Net layers, where the official network
    keeps 32 GroupNorm groups (one channel each): the converter sets that policy, so every
    intermediate tensor and the RRS channel choice equal the official ones."""
    torch.manual_seed(0)
    official = randomize_(OfficialRealNet(planes=(64, 64), mode_numbers=(16, 16)), torch.Generator().manual_seed(3)).eval()
    with torch.no_grad():
        official.rrs.decoder3[2].weight.div_(10)
        official.rrs.decoder3[2].bias.div_(10)
    model = convert_official_realnet(_save(tmp_path, official), image_size=SIZE)
    assert model.recon.unets[0].input_blocks[1][0].norm.num_groups == 32  # a 32-channel layer
    images = _images(3)
    with torch.no_grad():
        expected = official.intermediates(images)
        out = model(images)
    for name in ("features", "reconstructions", "residuals"):
        for ours, theirs in zip(getattr(out, name), expected[name]):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert max(r.abs().max().item() for r in expected["reconstructions"]) > 0.1  # non-trivial reconstructions
    # the ranking scores are far apart compared with rounding, so the channel choice is well defined
    for scores, k in zip(expected["rrs_scores"], official.mode_numbers):
        top = scores.topk(k + 1, dim=1).values
        assert (top[:, :-1] - top[:, 1:]).min() > 1e-4
    assert torch.equal(out.rrs_indices, expected["rrs_indices"])
    torch.testing.assert_close(out.anomaly_map, expected["anomaly_map"], rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "converted")
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["recon_norm_groups"] == "official"


def test_norm_group_policy_is_in_the_config_and_old_configs_load_unchanged(tmp_path):
    from realnet.model import RealNet

    tiny = {"backbone": "resnet18", "backbone_pretrained": False, "layers": [2, 3], "afs_channels": [64, 64],
            "image_size": SIZE, "recon_channel_mult": [1, 2], "recon_num_res_blocks": 1, "recon_attention_mult": [2]}
    adaptive, official = RealNet(**tiny), RealNet(**tiny, recon_norm_groups="official")
    assert adaptive.recon.unets[0].input_blocks[1][0].norm.num_groups == 16
    assert official.recon.unets[0].input_blocks[1][0].norm.num_groups == 32
    adaptive.selector.set_indices([torch.arange(64) * 2, torch.arange(64) * 4])
    adaptive.save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["recon_norm_groups"] == "adaptive"
    del config["recon_norm_groups"]  # a model saved before the setting existed loads as it was built
    config_path.write_text(json.dumps(config))
    reloaded = RealNet.from_pretrained(tmp_path / "m")
    assert reloaded.recon.unets[0].input_blocks[1][0].norm.num_groups == 16
    with pytest.raises(InputError, match="recon_norm_groups"):
        RealNet(**tiny, recon_norm_groups="32")
    with pytest.raises(InputError, match="recon_norm_groups='official'.*48"):
        RealNet(**{**tiny, "afs_channels": [96, 64]}, recon_norm_groups="official")


def test_non_square_size_converts_to_the_same_weights(tmp_path, official, converted):
    # The official decoder upsamples to a square (W*2, W*2), so it cannot run non-square images;
    # the converted model takes the same weights and runs them at the size it was given.
    model = convert_official_realnet(_save(tmp_path, official), tmp_path / "wide", image_size="64x96")
    assert list(model.image_size) == [64, 96]
    assert json.loads((tmp_path / "wide" / "config.json").read_text())["image_size"] == [64, 96]
    square = converted.state_dict()
    assert all(torch.equal(value, square[key]) for key, value in model.state_dict().items())
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert model(images).anomaly_map.shape == (2, 1, 64, 96)


@pytest.mark.parametrize("size, message", [("64x", "expected"), ("64x100", "multiple")])
def test_bad_sizes_are_one_line_errors_naming_the_flag(tmp_path, official, size, message):
    from typer.testing import CliRunner

    from realnet.cli import app

    path = _save(tmp_path, official)
    result = CliRunner().invoke(app, ["convert-official", str(path), str(tmp_path / "out"), "--image-size", size])
    assert result.exit_code == 2 and "--image-size" in result.output and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "model.safetensors").exists()
