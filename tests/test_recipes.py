"""Recipes, losses and the deterministic samplers of the training loop (no model training here)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from realnet.losses import realnet_loss, reconstruction_loss, segmentation_loss
from realnet.recipes import FAST, FAST_CHANGES, PAPER, Recipe, ablations, get_recipe, known_recipes
from realnet.training import BalancedBatchSampler, EpochBatchSampler, parse_key_values, split_holdout
from sia.errors import InputError


def test_unknown_recipe_is_one_line_error_listing_known_ones():
    with pytest.raises(InputError) as info:
        get_recipe("turbo")
    message = str(info.value)
    assert "\n" not in message
    assert "'turbo'" in message and "paper" in message and "fast" in message


def test_every_fast_change_name_is_a_recipe_or_a_one_line_error():
    """A change listed in FAST_CHANGES but equal in both recipes (loss_weights) has no ablation."""
    variants = ablations()
    for change in FAST_CHANGES:
        name = "fast-no-" + change.replace("_", "-")
        if name in variants:
            assert get_recipe(name) == variants[name]
            continue
        with pytest.raises(InputError) as info:
            get_recipe(name)
        assert "\n" not in str(info.value) and name in str(info.value) and "fast-no-ema" in str(info.value)
    assert "fast-no-loss-weights" not in variants  # the fast recipe keeps the paper's loss weights


def test_recipe_values_of_the_wrong_type_are_input_errors():
    for field, value in [("learning_rate", "fast"), ("ema_decay", "x"), ("batch_size", 2.5), ("betas", [0.9]),
                         ("balanced_batches", "yes"), ("grad_clip_norm", [1])]:
        with pytest.raises(InputError, match=field):
            FAST.replace(**{field: value})
    assert FAST.replace(betas=[0.5, 0.9]).betas == (0.5, 0.9) and FAST.replace(learning_rate=1).learning_rate == 1


def test_paper_recipe_has_the_official_settings():
    paper = get_recipe("paper")
    assert (paper.optimizer, paper.learning_rate, paper.lr_schedule, paper.weight_decay) == ("adam", 1e-4, "constant", 0.0)
    assert paper.grad_clip_norm is None and paper.ema_decay is None and paper.warmup_fraction == 0.0
    assert paper.segmentation_loss == "ce" and paper.segmentation_weight == paper.reconstruction_weight == 1.0
    assert paper.anomaly_probability == 0.5 and not paper.balanced_batches and not paper.nonempty_masks
    assert not paper.standardize_features and paper.rrs_bn_momentum == 0.9 and paper.batch_size == 16


def test_each_ablation_switches_back_exactly_its_fields():
    variants = ablations()
    assert variants, "the fast recipe must differ from the paper recipe"
    assert set(known_recipes()) == {"paper", "fast", *variants}
    for name, recipe in variants.items():
        change = name[len("fast-no-"):].replace("-", "_")
        fields = FAST_CHANGES[change]
        for field in fields:
            assert getattr(recipe, field) == getattr(PAPER, field)
        others = {f for f in FAST.to_dict() if f not in (*fields, "name", "description")}
        assert all(getattr(recipe, f) == getattr(FAST, f) for f in others), name
        assert get_recipe(name) == recipe


def test_replace_rejects_unknown_fields_and_bad_values():
    with pytest.raises(InputError, match="learning_rat"):
        FAST.replace(learning_rat=1.0)
    with pytest.raises(InputError, match="segmentation_loss"):
        FAST.replace(segmentation_loss="dice")
    with pytest.raises(InputError, match="anomaly_probability"):
        Recipe(name="x", anomaly_probability=1.5)


def test_learning_rate_schedule_warms_up_and_decays():
    recipe = Recipe(name="s", lr_schedule="cosine", warmup_fraction=0.1, min_lr_ratio=0.05)
    factors = [recipe.learning_rate_factor(i, 100) for i in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert recipe.learning_rate_factor(100, 100) == pytest.approx(0.05)
    assert all(PAPER.learning_rate_factor(i, 50) == 1.0 for i in range(50))


def test_segmentation_losses_agree_where_they_should():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, generator=generator)
    masks = (torch.rand(2, 1, 8, 8, generator=generator) > 0.8).float()
    plain = F.cross_entropy(logits, masks[:, 0].long())
    assert segmentation_loss(logits, masks, "ce") == pytest.approx(float(plain))
    assert segmentation_loss(logits, masks, "focal", focal_gamma=0.0) == pytest.approx(float(plain), rel=1e-5)
    # with no anomalous pixel, the class-balanced loss is the normal pixels' CE
    empty = torch.zeros_like(masks)
    assert segmentation_loss(logits, empty, "balanced_ce") == pytest.approx(float(segmentation_loss(logits, empty, "ce")))
    # the balanced loss gives the rare class half the weight
    per_pixel = F.cross_entropy(logits, masks[:, 0].long(), reduction="none")
    positive = masks[:, 0].bool()
    expected = 0.5 * (per_pixel[positive].mean() + per_pixel[~positive].mean())
    assert segmentation_loss(logits, masks, "balanced_ce") == pytest.approx(float(expected))
    # near-perfect logits give a near-zero loss for every kind; masks at another size are resized
    perfect = torch.cat([1 - masks, masks], 1) * 40 - 20
    for kind in ("ce", "balanced_ce", "focal"):
        assert float(segmentation_loss(perfect, masks, kind)) < 1e-6
    big = F.interpolate(masks, scale_factor=2, mode="nearest")
    assert segmentation_loss(logits, big, "ce") == pytest.approx(float(plain))
    with pytest.raises(InputError, match="segmentation loss"):
        segmentation_loss(logits, masks, "dice")


def test_reconstruction_loss_is_a_sum_of_per_level_mse():
    a = [torch.ones(1, 2, 4, 4), torch.zeros(1, 3, 2, 2)]
    b = [torch.zeros(1, 2, 4, 4), torch.full((1, 3, 2, 2), 2.0)]
    assert float(reconstruction_loss(a, a)) == 0.0
    assert float(reconstruction_loss(a, b)) == pytest.approx(1.0 + 4.0)
    logits = torch.zeros(1, 2, 4, 4)
    parts = realnet_loss(logits, torch.zeros(1, 1, 4, 4), a, b, segmentation_weight=2.0, reconstruction_weight=0.5)
    assert float(parts["loss"]) == pytest.approx(2.0 * math.log(2) + 0.5 * 5.0, rel=1e-5)


def test_balanced_batches_are_half_anomalous_and_reproducible():
    sampler = BalancedBatchSampler(size=10, batch_size=5, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    for batch in batches:
        assert sum(i >= 10 for i in batch) == 2 and sum(i < 10 for i in batch) == 3
    assert {i for b in batches for i in b if i >= 10} == set(range(10, 20))
    assert list(BalancedBatchSampler(10, 5, 3)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_balanced_categories_train_a_small_category_as_often_as_a_large_one():
    groups = [3, 9]  # category 0: normal items 0-2 (anomalous 12-14); category 1: 3-11 (15-23)
    sampler = BalancedBatchSampler(size=12, batch_size=8, seed=5, groups=groups)
    picks = [i for epoch in range(4) for i in (sampler.set_epoch(epoch) or [j for b in sampler for j in b])]
    normal = [i for i in picks if i < 12]
    anomalous = [i - 12 for i in picks if i >= 12]
    for half in (normal, anomalous):
        small = sum(i < 3 for i in half)
        assert small == len(half) // 2  # in proportion to the sizes this would be a quarter
        assert set(half) == set(range(12))  # every image of both categories is still drawn
    for batch in BalancedBatchSampler(12, 8, 5, groups):  # each batch: two of each category in each half
        assert sum(i < 3 for i in batch) == 2 and sum(12 <= i < 15 for i in batch) == 2
    assert list(BalancedBatchSampler(12, 8, 5, groups)) == list(BalancedBatchSampler(12, 8, 5, groups))
    # one category: exactly the unbalanced batches
    assert list(BalancedBatchSampler(12, 8, 5, [12])) == list(BalancedBatchSampler(12, 8, 5))
    with pytest.raises(InputError, match="groups: expected positive category sizes summing to 12"):
        BalancedBatchSampler(12, 8, 5, [3, 8])


def test_balance_categories_needs_balanced_batches():
    assert FAST.balance_categories and not get_recipe("fast-no-balance-categories").balance_categories
    assert not get_recipe("fast-no-balanced-batches").balance_categories  # its batches are not balanced at all
    with pytest.raises(InputError, match="balance_categories needs balanced_batches=true"):
        PAPER.replace(balance_categories=True)


def test_epoch_batches_cover_every_item_once_and_keep_the_last_partial_batch():
    sampler = EpochBatchSampler(size=11, batch_size=4, seed=0)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 3]
    assert sorted(i for b in batches for i in b) == list(range(11))
    sampler.set_epoch(5)
    assert list(sampler) != batches


def test_holdout_split_is_seeded_disjoint_and_complete():
    train, holdout = split_holdout(20, 0.15, seed=1)
    assert len(holdout) == 3 and not set(train) & set(holdout) and sorted(train + holdout) == list(range(20))
    assert split_holdout(20, 0.15, seed=1) == (train, holdout)
    assert split_holdout(3, 0.5, seed=0)[1] == []  # too small to hold anything out
    with pytest.raises(InputError, match="validation_fraction"):
        split_holdout(10, 1.0, seed=0)


def test_key_value_options_parse_json_values():
    assert parse_key_values(["a=1", "b=[1, 2]", "c=adamw", "d=null"], "--x") == {"a": 1, "b": [1, 2], "c": "adamw", "d": None}
    with pytest.raises(InputError, match="KEY=VALUE"):
        parse_key_values(["novalue"], "--recipe-option")


def test_mask_shape_field_is_checked_and_round_trips():
    assert PAPER.mask_shape == FAST.mask_shape == "perlin"
    cracks = FAST.replace(mask_shape="cracks")
    data = cracks.to_dict()
    assert data["mask_shape"] == "cracks" and Recipe(**{**data, "betas": tuple(data["betas"])}) == cracks
    old = {k: v for k, v in FAST.to_dict().items() if k != "mask_shape"}  # a config saved before the field
    assert Recipe(**old).mask_shape == "perlin"
    with pytest.raises(InputError, match="mask_shape") as info:
        FAST.replace(mask_shape="lines")
    assert "\n" not in str(info.value) and "cracks" in str(info.value)
    with pytest.raises(InputError, match="mask_shape"):
        FAST.replace(mask_shape=3)
