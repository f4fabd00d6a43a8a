"""RealNet end to end on a tiny random resnet18: shapes, freezing, AFS, statistics, Hub save/load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from realnet.losses import reconstruction_loss
from realnet.model import RealNet, default_afs_channels
from sia.errors import InputError

TINY = dict(backbone="resnet18", backbone_pretrained=False, afs_channels=[16, 24, 32, 16], image_size=64)
SPREAD_INDICES = [torch.arange(16) * 4, torch.arange(24) * 5, torch.arange(32) * 8, torch.arange(16) * 32]


@pytest.fixture(scope="module")
def model() -> RealNet:
    torch.manual_seed(0)
    net = RealNet(**TINY)
    for unet in net.recon.unets:  # leave the zero init so reconstructions and maps are non-trivial
        torch.nn.init.normal_(unet.out[-1].weight, std=0.05)
    net.selector.set_indices(SPREAD_INDICES)  # as after AFS, so the model can be saved and loaded
    return net.eval()


def _afs_batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        clean = torch.rand(2, 3, 64, 64, generator=gen)
        masks = torch.zeros(2, 1, 64, 64)
        masks[:, :, 16:40, 20:44] = 1
        yield {"image": clean * (1 - masks) + masks * 0.9, "clean_image": clean, "mask": masks}


def test_forward_shapes_square_and_non_square(model):
    for size in [(64, 64), (64, 96)]:
        images, clean = torch.rand(2, 3, *size), torch.rand(2, 3, *size)
        out = model(images, clean_images=clean)
        h, w = size
        assert out.anomaly_map.shape == (2, 1, h, w) and out.logits.shape == (2, 2, h, w)
        assert out.image_score.shape == (2,)
        torch.testing.assert_close(out.anomaly_map, out.logits.float().softmax(1)[:, 1:])  # P(anomalous) per pixel
        assert [tuple(f.shape) for f in out.features] == [
            (2, 16, h // 4, w // 4), (2, 24, h // 8, w // 8), (2, 32, h // 16, w // 16), (2, 16, h // 32, w // 32)
        ]
        assert [f.shape for f in out.clean_features] == [f.shape for f in out.features]
        assert out.rrs_indices.shape == (2, sum(model.rrs_top_k))
        alone = model(images)
        assert alone.clean_features is None
        torch.testing.assert_close(alone.anomaly_map, out.anomaly_map)


def test_zero_initialised_reconstruction():
    torch.manual_seed(0)
    fresh = RealNet(**TINY)
    out = fresh(torch.rand(1, 3, 64, 64))
    assert all(torch.count_nonzero(r) == 0 for r in out.reconstructions)
    assert all(torch.equal(res, f.pow(2)) for res, f in zip(out.residuals, out.features))


def test_train_keeps_backbone_frozen_and_in_eval():
    torch.manual_seed(0)
    net = RealNet(**TINY).train()
    assert not net.backbone.model.training and net.recon.training and net.discriminator.training
    trainable = {id(p) for p in net.trainable_parameters()}
    assert all(id(p) not in trainable and not p.requires_grad for p in net.backbone.parameters())
    backbone_before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    optimiser = torch.optim.Adam(net.trainable_parameters(), lr=1e-2)
    images, masks = torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.long)
    out = net(images, clean_images=images)
    loss = torch.nn.functional.cross_entropy(out.logits, masks) + sum(
        torch.nn.functional.mse_loss(r, c) for r, c in zip(out.reconstructions, out.clean_features)
    )
    loss.backward()
    optimiser.step()
    assert all(torch.equal(v, net.backbone.state_dict()[k]) for k, v in backbone_before.items())
    assert net.recon.unets[0].out[-1].weight.abs().sum() > 0


def test_select_features_stores_sorted_indices_once():
    torch.manual_seed(0)
    net = RealNet(**TINY)
    assert not net.afs_ready
    losses = net.select_features(_afs_batches(2), num_batches=2)
    assert net.afs_ready and [l.numel() for l in losses] == [64, 128, 256, 512]
    for idx, k in zip(net.selector.indices(), TINY["afs_channels"]):
        assert idx.numel() == k and torch.equal(idx, idx.unique())  # unique() sorts ascending
    with pytest.raises(RuntimeError, match="already selected"):
        net.select_features(_afs_batches(1), num_batches=1)


def test_fitting_shows_no_progress_of_its_own_and_reports_each_batch(capfd):
    torch.manual_seed(0)
    net = RealNet(**TINY)
    statistics, afs = [], []
    data = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    net.fit_feature_statistics(data, num_batches=2, on_batch=lambda: statistics.append(1))
    net.select_features(_afs_batches(2), num_batches=2, on_batch=lambda: afs.append(1))
    assert len(statistics) == 2 and len(afs) == 2 and capfd.readouterr().err == ""


def test_feature_statistics_standardise_normal_features():
    torch.manual_seed(0)
    net = RealNet(**TINY, standardize_features=True)
    data = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    raw = [torch.cat(level) for level in zip(*(net.backbone_features(x) for x in data))]
    net.fit_feature_statistics(data)
    assert net.feature_statistics_ready
    feats = [torch.cat(level) for level in zip(*(net.backbone_features(x) for x in data))]
    assert not torch.equal(raw[0], feats[0])
    for level, raw_level in zip(feats, raw):
        per_channel = level.transpose(0, 1).flatten(1)
        alive = raw_level.transpose(0, 1).flatten(1).std(dim=1) > 1e-4  # others hit the eps floor
        torch.testing.assert_close(per_channel.mean(1), torch.zeros(per_channel.shape[0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(per_channel[alive].std(1, unbiased=False), torch.ones(int(alive.sum())), atol=1e-3, rtol=0)


def test_defaults_and_input_errors():
    assert default_afs_channels([256, 512, 1024, 2048]) == [256, 512, 512, 256]
    assert default_afs_channels([24, 40, 112, 320]) == [24, 40, 112, 256]
    with pytest.raises(InputError, match=r"afs_channels\[0\]"):
        RealNet(**{**TINY, "afs_channels": [65, 8, 8, 8]})
    with pytest.raises(InputError, match="image_score"):
        RealNet(**{**TINY, "image_score": "mean"})


def test_bad_images_are_input_errors(model):
    with pytest.raises(InputError, match="images"):
        model(torch.rand(3, 64, 64))
    with pytest.raises(InputError, match="at least 32x32"):
        model(torch.rand(1, 3, 16, 16))
    with pytest.raises(InputError, match="clean_images"):
        model(torch.rand(1, 3, 64, 64), clean_images=torch.rand(2, 3, 64, 64))


def test_save_load_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path / "tiny")
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["afs_channels"] == [16, 24, 32, 16] and config["rrs_top_k"] == list(model.rrs_top_k)
    assert any(k.startswith("backbone.") for k in load_file(str(tmp_path / "tiny" / "model.safetensors")))
    loaded = RealNet.from_pretrained(tmp_path / "tiny")
    assert loaded.afs_ready and not loaded.training
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded(images).anomaly_map, model(images).anomaly_map, rtol=0, atol=0)
    prediction = loaded.predict(torch.rand(3, 80, 80))
    assert prediction.anomaly_map.shape == (1, 1, 64, 64) and prediction.image_score.shape == (1,)


def test_checkpoint_load_never_fetches_backbone_weights(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(backbone_pretrained=True, backbone_weights=str(tmp_path / "nowhere.pth"))
    config_path.write_text(json.dumps(config))
    loaded = RealNet.from_pretrained(tmp_path / "ckpt")  # offline, no such file: must not be touched
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(loaded(images).anomaly_map, model(images).anomaly_map, rtol=0, atol=0)


def test_hub_shaped_offline_cache(model, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--realnet-tiny"
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = RealNet.from_pretrained("acme/realnet-tiny", cache_dir=tmp_path / "hub")
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(loaded(images).anomaly_map, model(images).anomaly_map, rtol=0, atol=0)


def test_strict_loading_names_missing_and_unexpected_keys(model, tmp_path):
    model.save_pretrained(tmp_path / "good")
    state = load_file(str(tmp_path / "good" / "model.safetensors"))
    for name, change in [("missing", lambda s: s.pop("discriminator.decoder3.2.bias")),
                         ("unexpected", lambda s: s.__setitem__("extra.weight", torch.zeros(2)))]:
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        broken = dict(state)
        change(broken)
        save_file(broken, str(folder / "model.safetensors"))
        with pytest.raises(InputError, match=f"{name} keys: ") as err:
            RealNet.from_pretrained(folder)
        assert "\n" not in str(err.value)
        assert ("decoder3.2.bias" if name == "missing" else "extra.weight") in str(err.value)


def test_pickle_checkpoints_are_refused(model, tmp_path):
    model.save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(InputError, match="has no model.safetensors"):
        RealNet.from_pretrained(tmp_path / "pickled")


def test_full_official_size_on_meta_device():
    """WRN50 with 256/512/512/256: 518.2 M reconstruction + 5.87 M RRS parameters, as the official net."""
    with torch.device("meta"):
        net = RealNet(backbone_pretrained=False)
    assert net.afs_channels == [256, 512, 512, 256] and net.rrs_top_k == [256, 256]
    recon = sum(p.numel() for p in net.recon.parameters())
    head = sum(p.numel() for p in net.discriminator.parameters())
    assert round(recon / 1e6, 1) == 518.2 and round(head / 1e6, 2) == 5.87


# ---------------------------------------------------------------------------------------- input dtypes


def test_uint8_images_are_read_as_0_to_255(model):
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    as_float = model(images.float() / 255).anomaly_map
    torch.testing.assert_close(model(images).anomaly_map, as_float, rtol=0, atol=0)
    torch.testing.assert_close(model.predict(images).anomaly_map, model.predict(images.float() / 255).anomaly_map)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16, torch.bool])
def test_other_integer_images_are_refused(model, dtype):
    with pytest.raises(InputError, match=f"images: expected float images in \\[0,1\\] or uint8 .*{dtype}"):
        model(torch.zeros(1, 3, 64, 64, dtype=dtype))
    with pytest.raises(InputError, match="clean_images: expected float images"):
        model(torch.zeros(1, 3, 64, 64), clean_images=torch.zeros(1, 3, 64, 64, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_other_float_precisions_are_cast_to_the_model_dtype(model, dtype):
    images = torch.rand(1, 3, 64, 64).to(dtype)
    out = model(images, clean_images=images)
    assert out.anomaly_map.dtype == torch.float32 and out.features[0].dtype == model.dtype == torch.float32
    # Like with like: with clean images the backbone sees a batch of two, a different kernel call
    # from a batch of one (on some CPUs that moves map values by ~1e-7), so both calls pass them.
    as_float = model(images.float(), clean_images=images.float())
    torch.testing.assert_close(out.anomaly_map, as_float.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(out.anomaly_map, model(images.float()).anomaly_map, rtol=1e-5, atol=1e-6)
    assert model.predict(images).anomaly_map.shape == (1, 1, 64, 64)


# ---------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("layers", [[4, 3], [1, 3, 2], [2, 2]])
def test_layers_out_of_order_or_repeated_are_refused(layers):
    with pytest.raises(InputError, match="layers: expected strictly ascending, unique"):
        RealNet(**{**TINY, "layers": layers, "afs_channels": None})


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, None])
def test_predict_needs_a_positive_integer_batch_size(model, batch_size):
    with pytest.raises(InputError, match="batch_size: expected a positive integer"):
        model.predict(torch.rand(2, 3, 64, 64), batch_size=batch_size)


def test_predict_batches_give_the_same_result(model):
    images = torch.rand(3, 3, 64, 64)
    whole, one_by_one = model.predict(images, batch_size=8), model.predict(images, batch_size=1)
    assert whole.anomaly_map.shape == (3, 1, 64, 64)
    torch.testing.assert_close(one_by_one.image_score, whole.image_score)


@pytest.mark.parametrize("top_k", [[0, 8], [8, -1], [8]])
def test_non_positive_rrs_top_k_is_refused(top_k):
    with pytest.raises(InputError, match="rrs_top_k"):
        RealNet(**{**TINY, "rrs_top_k": top_k})


def test_image_size_accepts_whole_floats_only():
    assert RealNet(**{**TINY, "image_size": 64.0}).image_size == [64, 64]
    assert RealNet(**{**TINY, "image_size": [64.0, 96]}).image_size == [64, 96]
    for bad in (64.5, "64", [64, 96, 128], True, [64, None]):
        with pytest.raises(InputError, match="image_size"):
            RealNet(**{**TINY, "image_size": bad})


def test_reconstruction_loss_level_mismatch_is_input_error():
    with pytest.raises(InputError, match="2 reconstructions for 1 feature levels"):
        reconstruction_loss([torch.zeros(1, 2, 4, 4)] * 2, [torch.zeros(1, 2, 4, 4)])


# ---------------------------------------------------------------------------------------- AFS masks


def test_select_features_binarises_masks_and_accepts_both_layouts():
    torch.manual_seed(0)
    net = RealNet(**TINY)
    reference = net.select_features(_afs_batches(2), num_batches=2)
    variants = [lambda m: m[:, 0], lambda m: (m * 255).to(torch.uint8), lambda m: m * 255]
    for convert in variants:
        batches = [{**b, "mask": convert(b["mask"])} for b in _afs_batches(2)]
        losses = net.select_features(batches, num_batches=2, force=True)
        for got, want in zip(losses, reference):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: {**b, "mask": b["mask"][:1]}, "masks .* do not match the images"),
        (lambda b: {**b, "mask": b["mask"][..., :32, :32]}, "masks .* do not match the images"),
        (lambda b: {**b, "mask": b["mask"].repeat(1, 3, 1, 1)}, r"masks as a tensor \(B,H,W\) or \(B,1,H,W\)"),
        (lambda b: {**b, "clean_image": b["clean_image"][:1]}, "clean images .* shape of the anomalous"),
    ],
)
def test_select_features_refuses_mismatched_batches(change, message):
    torch.manual_seed(0)
    net = RealNet(**TINY)
    with pytest.raises(InputError, match=message):
        net.select_features([change(b) for b in _afs_batches(1)], num_batches=1)
    assert not net.afs_ready


# ---------------------------------------------------------------------------------------- loading


def test_missing_folders_and_bad_repo_ids_are_one_line_input_errors(tmp_path):
    cases = [
        (str(tmp_path / "not" / "here"), "the folder .* does not exist"),
        ("/tmp/not/here", "the folder .* does not exist"),
        ("./nowhere", "the folder .* does not exist"),
        ("not a repo!!", "neither an existing folder nor a valid Hub repo id"),
        ("acme/--bad--", "neither an existing folder nor a valid Hub repo id"),
        (str(tmp_path), "has no model.safetensors"),  # an existing folder that is not a model
    ]
    (tmp_path / "file.txt").write_text("x")
    cases.append((str(tmp_path / "file.txt"), "is a file; expected a model folder"))
    for name, message in cases:
        with pytest.raises(InputError, match=message) as err:
            RealNet.from_pretrained(name)
        assert "\n" not in str(err.value) and "pretrained_model_name_or_path" in str(err.value)


def test_missing_repo_offline_is_input_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="'acme/no-such-model': config.json is not in the local Hub cache") as err:
        RealNet.from_pretrained("acme/no-such-model", cache_dir=tmp_path / "hub")
    assert "\n" not in str(err.value)


def test_cached_repo_without_weights_names_the_weights_file(model, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--no-weights"
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "snapshots" / commit / "model.safetensors").unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with pytest.raises(InputError, match="model.safetensors is not in the local Hub cache"):
        RealNet.from_pretrained("acme/no-weights", cache_dir=tmp_path / "hub")


def _rewrite_weights(tmp_path, model, name: str, **changes: torch.Tensor):
    folder = tmp_path / name
    model.save_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    state.update(changes)
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("selector.indices_3", torch.arange(16) * 40, r"layer 3 .* channels 0\.\.511"),
        ("selector.indices_0", torch.arange(16) - 1, "layer 0 .* channels 0..63"),
        ("selector.indices_1", torch.arange(24).flip(0), "layer 1 .* sorted ascending and unique"),
        ("selector.indices_2", torch.zeros(32, dtype=torch.long), "layer 2 .* sorted ascending and unique"),
    ],
)
def test_loading_refuses_bad_afs_indices(model, tmp_path, key, value, message):
    folder = _rewrite_weights(tmp_path, model, "bad_afs", **{key: value})
    with pytest.raises(InputError, match=f"AFS indices: {message}") as err:
        RealNet.from_pretrained(folder)
    assert str(folder / "model.safetensors") in str(err.value)


def test_loading_refuses_a_model_saved_before_feature_selection(model, tmp_path):
    folder = _rewrite_weights(tmp_path, model, "no_afs", **{"selector.ready": torch.tensor(False)})
    with pytest.raises(InputError, match="saved before feature selection"):
        RealNet.from_pretrained(folder)
    torch.manual_seed(0)
    fresh = RealNet(**TINY)
    fresh.save_pretrained(tmp_path / "fresh")
    with pytest.raises(InputError, match="saved before feature selection"):
        RealNet.from_pretrained(tmp_path / "fresh")
