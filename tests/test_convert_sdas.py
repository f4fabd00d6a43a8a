"""Official SDAS (guided-diffusion ADM) checkpoints convert to diffusers with identical outputs."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from official_adm import OfficialADM, randomize_
from sia.convert import (
    adm_unet_config,
    convert_adm_unet,
    convert_official_sdas,
    load_official_checkpoint,
)
from sia.errors import InputError

SIZE = 16


def _official(seed: int = 0, **kwargs) -> OfficialADM:
    return randomize_(OfficialADM(**kwargs), torch.Generator().manual_seed(seed)).eval()


def _compare(reference: OfficialADM, unet, classes: int = 3) -> float:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, SIZE, SIZE, generator=g)
    t = torch.tensor([0, 421, 999])
    y = torch.arange(3) % classes
    with torch.no_grad():
        expected = reference(x, t, y)
        actual = unet(x, t, class_labels=y).sample
    assert actual.shape == expected.shape == (3, 6, SIZE, SIZE)
    return (expected - actual).abs().max().item()


@pytest.mark.parametrize("kwargs", [
    dict(head_channels=32),                                   # spec config: 1 head at 64 ch (2 at mid)
    dict(head_channels=16),                                   # several heads: legacy reorder matters
    dict(head_channels=16, scale_shift=False),                # plain additive time embedding
    dict(num_res_blocks=2, channel_mult=(1, 2, 2), attention_ds=(2, 4), head_channels=16),
])
def test_converted_unet_matches_official_forward(kwargs):
    reference = _official(**kwargs)
    unet = convert_adm_unet(reference.state_dict(), sample_size=SIZE, num_head_channels=kwargs["head_channels"])
    assert _compare(reference, unet) < 1e-4
    # every parameter of the diffusers model came from the checkpoint: equal parameter counts
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in reference.parameters())


def test_config_is_inferred_from_shapes():
    reference = _official(num_res_blocks=2, channel_mult=(1, 2, 2), attention_ds=(2, 4), head_channels=16, num_classes=5)
    config = adm_unet_config(reference.state_dict(), sample_size=SIZE, num_head_channels=16)
    assert config["block_out_channels"] == (32, 64, 64)
    assert config["layers_per_block"] == 2
    assert config["down_block_types"] == ("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert config["up_block_types"] == ("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
    assert config["num_class_embeds"] == 5 and config["out_channels"] == 6
    assert config["resnet_time_scale_shift"] == "scale_shift"


def test_legacy_qkv_reorder_is_needed_with_several_heads(monkeypatch):
    """Without the per-head reorder the converted model is wrong, so the comparison can fail."""
    reference = _official(head_channels=16)
    import sia.convert as convert

    monkeypatch.setattr(convert, "_legacy_qkv_to_qkv", lambda tensor, heads: tensor.chunk(3, dim=0))
    naive = convert.convert_adm_unet(reference.state_dict(), sample_size=SIZE, num_head_channels=16)
    assert _compare(reference, naive) > 1e-2


def test_ddp_prefixed_checkpoint_with_easydict_arch_loads_weights_only(tmp_path, monkeypatch):
    """Released checkpoints pickle an easydict.EasyDict 'arch'; it loads without easydict installed."""
    reference = _official()
    fake = types.ModuleType("easydict")

    class EasyDict(dict):
        def __init__(self, d=None, **kw):
            super().__init__()
            for key, value in dict(d or {}, **kw).items():
                setattr(self, key, value)

        def __setattr__(self, name, value):
            value = EasyDict(value) if isinstance(value, dict) and not isinstance(value, EasyDict) else value
            super().__setattr__(name, value)
            super().__setitem__(name, value)

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    fake.EasyDict = EasyDict
    monkeypatch.setitem(sys.modules, "easydict", fake)
    arch = EasyDict({"unet": {"classifier_width": 32, "learn_sigma": True}, "class_number": 3})
    checkpoint = {
        "epoch": 240,
        "arch": arch,
        "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()},
        "loss": 0.01,
    }
    path = tmp_path / "ckpt_240.pth.tar"
    torch.save(checkpoint, path)
    monkeypatch.delitem(sys.modules, "easydict")

    with pytest.raises(Exception):  # plain weights-only loading refuses the EasyDict
        torch.load(path, weights_only=True)
    state, metadata = load_official_checkpoint(path)
    assert metadata["epoch"] == 240
    assert type(metadata["arch"]) is dict and metadata["arch"]["unet"]["classifier_width"] == 32
    assert set(state) == set(reference.state_dict())
    unet = convert_adm_unet(state, sample_size=SIZE, num_head_channels=32)
    assert _compare(reference, unet) < 1e-4


def test_other_pickled_classes_are_still_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": types.SimpleNamespace(a=1)}, path)
    with pytest.raises(InputError, match="weights-only"):
        load_official_checkpoint(path)


def test_bad_checkpoints_are_one_line_input_errors(tmp_path):
    state = _official().state_dict()
    extra = dict(state, **{"input_blocks.1.0.surprise.weight": torch.zeros(2)})
    with pytest.raises(InputError, match=r"unexpected keys \(1\): input_blocks.1.0.surprise.weight") as err:
        convert_adm_unet(extra, sample_size=SIZE, num_head_channels=32)
    assert "\n" not in str(err.value)

    missing = {k: v for k, v in state.items() if k != "middle_block.1.proj_out.bias"}
    with pytest.raises(InputError, match="missing keys .*middle_block.1.proj_out.bias"):
        convert_adm_unet(missing, sample_size=SIZE, num_head_channels=32)

    wrong = dict(state)
    wrong["out.2.bias"] = torch.zeros(7)
    with pytest.raises(InputError, match="wrong shape .*conv_out.bias"):
        convert_adm_unet(wrong, sample_size=SIZE, num_head_channels=32)

    with pytest.raises(InputError, match="not a guided-diffusion ADM"):
        convert_adm_unet({"weight": torch.zeros(3)}, sample_size=SIZE)
    with pytest.raises(InputError, match="no such checkpoint"):
        load_official_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt"):
        load_official_checkpoint(tmp_path / "junk.pt")


def test_head_width_and_image_size_are_refused_when_the_weights_do_not_tell():
    """A 32-wide checkpoint with 32-channel heads: the shapes are those of any head count, so no guess."""
    state = _official(head_channels=32).state_dict()
    with pytest.raises(InputError, match=r"pass `num_head_channels` or `num_heads`") as err:
        convert_adm_unet(state, sample_size=SIZE)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"pass `sample_size`") as err:
        convert_adm_unet(state, num_head_channels=32)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="same width"):
        adm_unet_config(_official(num_res_blocks=2, channel_mult=(1, 2, 2), attention_ds=(1, 2)).state_dict(),
                        sample_size=SIZE, num_heads=2)


@pytest.mark.parametrize("unet_arch", [{"num_head_channels": 32, "num_heads": 4}, {"num_head_channels": -1, "num_heads": 2}])
def test_arch_metadata_gives_head_width_and_image_size(tmp_path, unet_arch):
    """The official checkpoints carry their training config (`arch`): heads and size come from it."""
    reference = _official(head_channels=32)
    arch = {"unet": {"classifier_width": 32, **unet_arch}, "dataset": {"input_size": [SIZE, SIZE]}}
    path = tmp_path / "ckpt_240.pth.tar"
    torch.save({"epoch": 240, "arch": arch, "state_dict": reference.state_dict()}, path)
    out = convert_official_sdas(path, tmp_path / "pipe", dataset="btad")
    from sia.pipeline import SDASPipeline

    unet = SDASPipeline.from_pretrained(out).unet
    assert unet.config.sample_size == SIZE and unet.config.attention_head_dim == 32
    assert _compare(reference, unet) < 1e-4
    # the old default (64-channel heads) computes something else: the metadata matters
    assert _compare(reference, convert_adm_unet(reference.state_dict(), sample_size=SIZE, num_head_channels=64)) > 1e-2


def test_the_released_layout_needs_no_settings():
    """The released SDAS / OpenAI 256x256 layout is recognised: 256 px, 64-channel heads (shapes only, meta device)."""
    with torch.device("meta"):
        released = OfficialADM(model_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
                               attention_ds=(8, 16, 32), head_channels=64, num_classes=15)
    config = adm_unet_config(released.state_dict())
    assert config["sample_size"] == 256 and config["attention_head_dim"] == 64
    assert config["block_out_channels"] == (256, 256, 512, 512, 1024, 1024) and config["num_class_embeds"] == 15
    assert adm_unet_config(released.state_dict(), sample_size=128, num_head_channels=128)["attention_head_dim"] == 128


def test_cli_names_the_missing_flag_and_init_from_still_reads_the_weights(tmp_path):
    from typer.testing import CliRunner

    from sia.cli import app
    from sia.warm_start import load_init_state_dict

    reference = _official(head_channels=32)
    path = tmp_path / "small.pt"
    torch.save({"state_dict": reference.state_dict()}, path)
    result = CliRunner().invoke(app, ["convert-official", str(path), str(tmp_path / "pipe"), "--dataset", "btad",
                                      "--image-size", str(SIZE)])
    assert result.exit_code == 2 and "--head-channels" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "pipe").exists()
    # --init-from only initialises another UNet: the target's head width groups the qkv rows
    state = load_init_state_dict(str(path), {"sample_size": SIZE, "attention_head_dim": 32})
    unet = convert_adm_unet(reference.state_dict(), sample_size=SIZE, num_head_channels=32)
    assert state.keys() == unet.state_dict().keys()
    assert all(torch.equal(state[k], unet.state_dict()[k]) for k in state)
