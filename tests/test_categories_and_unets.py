"""Category resolution and the diffusion UNet presets."""

import pytest
import torch

from sia.categories import DATASET_CATEGORIES, known_categories, resolve_category, resolve_dataset
from sia.errors import InputError
from sia.unets import UNET_PRESETS, build_unet, unet_config


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


def test_adm_preset_matches_the_official_layout():
    config = UNET_PRESETS["adm-256"]
    assert config["block_out_channels"] == (256, 256, 512, 512, 1024, 1024)
    assert config["attention_head_dim"] == 64 and config["resnet_time_scale_shift"] == "scale_shift"
    assert config["down_block_types"].count("AttnDownBlock2D") == 3  # 32, 16 and 8 px


def test_image_size_must_fit_the_down_factor():
    assert unet_config("small-64", 2, sample_size=128)["sample_size"] == 128
    with pytest.raises(InputError, match="multiple of 8"):
        unet_config("small-64", 2, sample_size=100)
    with pytest.raises(InputError, match="known"):
        unet_config("huge", 2)
