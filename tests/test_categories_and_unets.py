"""Category resolution and the diffusion UNet presets."""

import pytest
import torch

from sia.categories import DATASET_CATEGORIES, known_categories, resolve_category, resolve_dataset
from sia.errors import InputError
from sia.unets import UNET_PRESETS, build_unet, unet_config, unet_input


def test_all_36_categories_resolve_both_ways():
    names = known_categories()
    assert len(names) == 36 == len(set(names))
    for qualified in names:
        dataset, category = qualified.split("/")
        assert resolve_category(qualified) == (dataset, category)
        assert resolve_category(category) == (dataset, category)


def test_official_class_order_is_kept():
    assert DATASET_CATEGORIES["mvtec-ad"][0] == "bottle" and DATASET_CATEGORIES["mvtec-ad"][14] == "zipper"
    assert DATASET_CATEGORIES["visa"][7] == "pcb1"
    assert resolve_dataset("MVTec-AD") == "mvtec-ad"


def test_unknown_names_list_the_known_ones():
    with pytest.raises(InputError, match="mvtec-ad/bottle"):
        resolve_category("bottel")
    with pytest.raises(InputError, match="visa"):
        resolve_dataset("kolektor")


def test_tiny_preset_is_class_conditional_with_learned_variance():
    unet = build_unet("tiny-32", num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    out = unet(x, torch.tensor([10, 500]), class_labels=torch.tensor([0, 2])).sample
    assert out.shape == (2, 6, 32, 32)
    other = unet(x, torch.tensor([10, 500]), class_labels=torch.tensor([1, 1])).sample
    assert not torch.allclose(out, other)


def _attention_widths(config: dict, size: int):
    """Where attention runs (feature-map widths, counted) in a preset's block layout, narrowed so it is quick."""
    from collections import Counter

    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention

    levels = len(config["block_out_channels"])
    narrow = {**config, "block_out_channels": (8,) * levels, "attention_head_dim": 8, "norm_num_groups": 4,
              "attn_norm_num_groups": 4, "num_class_embeds": 2}
    unet = UNet2DModel(**narrow).eval()
    widths: list[int] = []
    for module in unet.modules():
        if isinstance(module, Attention):
            module.register_forward_pre_hook(lambda _, args: widths.append(args[0].shape[-1]))
    with torch.no_grad():
        unet(torch.zeros(1, 3, size, size), torch.tensor([10]), class_labels=torch.tensor([1]))
    return Counter(widths)


def test_adm_preset_puts_attention_exactly_at_32_16_and_8_px():
    config = UNET_PRESETS["adm-256"]
    assert config["block_out_channels"] == (256, 256, 512, 512, 1024, 1024)
    assert config["attention_head_dim"] == 64 and config["resnet_time_scale_shift"] == "scale_shift"
    # ADM: 2 res blocks per level going down, 3 going up, one attention each at ds 8/16/32, plus the middle block.
    assert _attention_widths(config, 256) == {32: 2 + 3, 16: 2 + 3, 8: 2 + 1 + 3}


def test_adm_preset_has_the_parameter_count_of_the_official_adm_256():
    """Counted on the meta device against an independent ADM build (tests/official_adm.py)."""
    from official_adm import OfficialADM

    with torch.device("meta"):
        official = OfficialADM(model_channels=256, num_res_blocks=2, attention_ds=(8, 16, 32),
                               channel_mult=(1, 1, 2, 2, 4, 4), num_classes=15, head_channels=64)
        ours = build_unet("adm-256", num_classes=15)
    official_count = sum(p.numel() for p in official.parameters())
    assert official_count == 552_829_446
    assert sum(p.numel() for p in ours.parameters()) == official_count


def test_small_preset_puts_attention_only_at_8_px():
    """As the official code does at 64 px: its attention resolutions [32, 16, 8] are read as downsample factors."""
    config = UNET_PRESETS["small-64"]
    assert config["block_out_channels"] == (64, 128, 128, 128) and config["attention_head_dim"] == 64
    # 2 attention blocks going down, the middle block, 3 going up, all at ds 8 (8 px).
    assert _attention_widths(config, 64) == {8: 2 + 1 + 3}


@pytest.mark.parametrize(("preset", "adm", "count"), [
    ("small-64", dict(model_channels=64, channel_mult=(1, 2, 2, 2), attention_ds=(8,)), 10_738_630),
    ("adm-256", dict(model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), attention_ds=(8, 16, 32)), 552_829_446),
])
def test_official_adm_weights_map_onto_the_preset_key_for_key(preset, adm, count):
    """The official network's state dict (tests/official_adm.py, meta device) becomes the preset's, tensor for tensor."""
    from official_adm import OfficialADM

    from sia.convert import adm_to_diffusers_state_dict, adm_unet_config

    config = unet_config(preset, num_classes=15)
    with torch.device("meta"):
        official = OfficialADM(num_res_blocks=2, num_classes=15, head_channels=64, **adm)
        ours = build_unet(preset, num_classes=15)
    assert sum(p.numel() for p in official.parameters()) == count == sum(p.numel() for p in ours.parameters())
    inferred = adm_unet_config(official.state_dict(), sample_size=config["sample_size"], num_head_channels=64)
    assert {k: inferred[k] for k in config} == config
    mapped = adm_to_diffusers_state_dict(official.state_dict(), config)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_a_pipeline_saved_with_the_previous_small_preset_loads_with_its_own_layout(tmp_path):
    """Saved pipelines rebuild their UNet from their config.json, not from the preset: the old layout
    (attention also at 16 px, 32-channel heads; narrowed here) still loads and computes the same."""
    from diffusers import UNet2DModel

    from sia.pipeline import SDASPipeline
    from sia.scheduler import make_scheduler
    from sia.unets import _adm_config

    torch.manual_seed(0)
    old = {**_adm_config(16, (32, 32, 32, 32), (False, False, True, True), 1, 32, 32), "num_class_embeds": 2}
    trained = UNet2DModel(**old).eval()
    SDASPipeline(unet=trained, scheduler=make_scheduler("ddpm"), categories=["a", "b"]).save_pretrained(tmp_path / "old")
    saved = SDASPipeline.from_pretrained(tmp_path / "old")
    assert tuple(saved.unet.config.down_block_types) == old["down_block_types"]
    assert saved.unet.config.attention_head_dim == 32
    x, t, y = torch.randn(1, 3, 16, 16), torch.tensor([10]), torch.tensor([1])
    with torch.no_grad():
        torch.testing.assert_close(saved.unet(x, t, class_labels=y).sample, trained(x, t, class_labels=y).sample)


def test_image_size_must_fit_the_down_factor():
    assert unet_config("small-64", 2, sample_size=128)["sample_size"] == 128
    with pytest.raises(InputError, match="multiple of 8"):
        unet_config("small-64", 2, sample_size=100)
    with pytest.raises(InputError, match="known"):
        unet_config("huge", 2)


def test_unet_input_is_channels_last_on_cpu_with_the_same_values_and_output():
    """Sampling feeds the UNet channels-last on CPU (faster convolutions); only the layout may change."""
    torch.manual_seed(0)
    unet = build_unet("tiny-32", num_classes=2, sample_size=16).eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    prepared = unet_input(x, torch.float32)
    assert prepared.dtype == torch.float32 and prepared.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(prepared, x.float())
    with torch.no_grad():
        fast = unet(prepared, torch.tensor(10), class_labels=torch.tensor([0, 1])).sample
        plain = unet(x.float(), torch.tensor(10), class_labels=torch.tensor([0, 1])).sample
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert unet_input(torch.zeros(2, 3, device="meta"), torch.float32).is_contiguous()  # not an image batch
