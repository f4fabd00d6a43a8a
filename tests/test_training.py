"""End-to-end RealNet training on tiny generated data (random resnet18, 64 px, a few iterations)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from realnet import data as realnet_data
from realnet.evaluation import evaluate
from realnet.model import RealNet
from realnet import training as realnet_training
from realnet.batching import seeded_batches
from realnet.recipes import get_recipe
from realnet.training import ExponentialMovingAverage, TrainingConfig, load_category_data, split_holdout, train
from sia.errors import InputError

TINY_MODEL = dict(
    backbone_pretrained=False,
    layers=[1, 2],
    afs_channels=[8, 16],
    recon_channel_mult=[1, 2],
    recon_attention_mult=[2],
)


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth grey texture with faint stripes: the 'normal' product surface."""
    coarse = rng.normal(0.0, 1.0, (size // 8, size // 8, 3)) * 20 + 128
    image = np.asarray(Image.fromarray(coarse.clip(0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), dtype=float)
    return image + 10 * np.sin(np.arange(size)[:, None, None] / 3.0)


def make_dataset(root: Path, n_train: int = 12, n_good: int = 6, n_bad: int = 8, size: int = 64, seed: int = 0) -> Path:
    """MVTec-style category folder with dark or bright round defects planted in the test images."""
    rng = np.random.default_rng(seed)
    for folder in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(_texture(rng, size).clip(0, 255).astype(np.uint8)).save(root / f"train/good/{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(_texture(rng, size).clip(0, 255).astype(np.uint8)).save(root / f"test/good/{i:03d}.png")
    yy, xx = np.ogrid[:size, :size]
    for i in range(n_bad):
        image = _texture(rng, size)
        radius = int(rng.integers(size // 10, size // 6))
        cy, cx = rng.integers(radius, size - radius, 2)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius
        image[blob] = rng.choice([25.0, 230.0]) + rng.normal(0, 5, (int(blob.sum()), 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / f"test/blob/{i:03d}.png")
        Image.fromarray(blob.astype(np.uint8) * 255).save(root / f"ground_truth/blob/{i:03d}_mask.png")
    return root


def make_texture_folder(root: Path, per_class: int = 3, size: int = 48, seed: int = 1) -> Path:
    """A DTD-like source folder, ``<class>/<image>``, of strongly coloured noise textures."""
    rng = np.random.default_rng(seed)
    for name in ("spotted", "noisy"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.uniform(0, 255, 3) + rng.normal(0, 40, (size, size, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / name / f"{name}_{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(root / "widget")
    return root


@pytest.fixture(scope="module")
def texture_source(tmp_path_factory) -> str:
    return "dtd:" + str(make_texture_folder(tmp_path_factory.mktemp("dtd")))


def tiny_config(data_root: Path, output: Path, **changes) -> TrainingConfig:
    settings = dict(
        data=str(data_root), output=str(output), source="cutpaste", dataset="mvtec-ad", categories=["widget"],
        recipe="fast", backbone="resnet18", image_size=64, iterations=3, batch_size=4, afs_batches=1,
        model_kwargs=dict(TINY_MODEL), validation_fraction=0.25, checkpoint_every=0, progress=False, cpu=True, log_every=1,
    )
    settings.update(changes)
    return TrainingConfig(**settings)


@pytest.mark.parametrize("recipe", ["paper", "fast"])
def test_both_recipes_train_end_to_end(data_root, tmp_path, recipe):
    model_dir = train(tiny_config(data_root, tmp_path / "run", recipe=recipe))
    assert model_dir == tmp_path / "run" / "model"
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run["status"] == "finished" and run["recipe"]["name"] == recipe and run["total_iterations"] == 3
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["iteration"] == 3 and all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    thresholds = json.loads((model_dir / "thresholds.json").read_text())
    assert 0.0 <= thresholds["image_threshold"] <= 1.0 and 0.0 <= thresholds["pixel_threshold"] <= 1.0
    assert thresholds["calibration_images"] == 3 and "held-out" in thresholds["calibrated_on"]
    model = RealNet.from_pretrained(str(model_dir))
    assert model.afs_ready
    assert not model.standardize_features and not model.feature_statistics_ready  # both recipes: raw features
    # the card states the licence inherited from MVTec AD, not the library's MIT default
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    assert "license: cc-by-nc-sa-4.0" in card and "license: mit" not in card
    assert f"| recipe | {recipe} |" in card and "| iterations | 3 |" in card and "widget" in card
    output = model.predict(torch.rand(2, 3, 64, 64))
    assert output.anomaly_map.shape == (2, 1, 64, 64)


def poisoned_test_split(data_root: Path, copy: Path) -> Path:
    """A copy of the dataset whose test images and masks are not images at all: a run that decoded
    one would fail, so a run that succeeds never used them."""
    shutil.copytree(data_root, copy)
    for folder in ("test", "ground_truth"):
        for path in (copy / "widget" / folder).rglob("*.png"):
            path.write_bytes(b"test data: never to be read by training")
    return copy


def test_feature_statistics_come_from_normal_training_images_only(data_root, tmp_path, monkeypatch, opened_files):
    seen: list[torch.Tensor] = []
    original_fit = RealNet.fit_feature_statistics

    def recording_fit(self, batches, *args, **kwargs):
        def record():
            for batch in batches:
                seen.append(batch.detach().cpu().clone())
                yield batch
        return original_fit(self, record(), *args, **kwargs)

    monkeypatch.setattr(RealNet, "fit_feature_statistics", recording_fit)
    poisoned = poisoned_test_split(data_root, tmp_path / "data")
    opened_files.clear()  # from here on: what training opens
    config = tiny_config(poisoned, tmp_path / "run", recipe="fast", recipe_overrides={"standardize_features": True})
    model_dir = train(config)
    _assert_only_training_images_were_read(opened_files, poisoned / "widget")

    used = torch.cat(seen)
    normal = realnet_data.load_split(data_root, "mvtec-ad", "widget", "train", image_size=64)
    train_ids, holdout_ids = split_holdout(len(normal), config.validation_fraction, config.seed)
    expected = torch.stack([normal[i]["image"] for i in train_ids])
    held_out = torch.stack([normal[i]["image"] for i in holdout_ids])
    assert used.shape[0] == expected.shape[0]
    # every image is a clean training image (sorted to ignore order), none is held out or anomalous
    key = lambda images: sorted(images.flatten(1).sum(1).tolist())  # noqa: E731
    assert key(used) == pytest.approx(key(expected))
    assert not any(torch.equal(u, h) for u in used for h in held_out)

    model = RealNet.from_pretrained(str(model_dir))
    features = model.backbone(expected)
    mean0, std0 = model.standardizer.statistics(0)
    assert torch.allclose(mean0, features[0].mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(std0, features[0].std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-5), atol=1e-4)
    state = load_file(str(model_dir / "model.safetensors"))
    assert any(k.startswith("standardizer.mean") for k in state)


def test_only_normal_training_images_are_used(tmp_path):
    root = tmp_path / "data"
    make_dataset(root / "widget", n_train=6, n_good=1, n_bad=1)
    for i in range(3):  # defective images under train/, without masks: must be skipped, not trained on
        (root / "widget" / "train" / "blob").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "widget" / "train" / "blob" / f"{i}.png")
    config = tiny_config(root, tmp_path / "run", validation_fraction=0.0)
    (category,) = load_category_data(config, get_recipe("fast"))
    assert len(category.train) == 6 and len(category.holdout) == 0
    assert all(category.train[j]["image"].sum() > 0 for j in range(6))  # none of the black defect images
    assert category.synthesizer.mask_shape == "perlin"
    (cracked,) = load_category_data(config, get_recipe("fast").replace(mask_shape="mixed"))
    assert cracked.synthesizer.mask_shape == "mixed" and cracked.synthesizer.require_nonempty


def test_ema_averages_only_what_training_changes():
    model = RealNet(backbone="resnet18", image_size=64, **TINY_MODEL)
    shadow = ExponentialMovingAverage(model, 0.9).shadow
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= set(shadow)
    assert "rrs.bn.running_mean" in shadow and "rrs.bn.running_var" in shadow
    assert not any(k.startswith(("backbone.", "selector.", "standardizer.")) for k in shadow)


def test_afs_batches_draw_fresh_anomalies_when_they_wrap_around():
    class Recorder(torch.utils.data.Dataset):
        epoch = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return 4

        def __getitem__(self, index):
            return {"image": torch.full((1,), float(self.epoch))}

    data = Recorder()
    batches = list(seeded_batches(data, 2, seed=0, limit=5, parts=[data]))
    assert [int(b["image"].max()) for b in batches] == [0, 0, 1, 1, 2]


def test_short_training_on_planted_defects_beats_chance(data_root, tmp_path, texture_source):
    torch.manual_seed(0)
    config = tiny_config(data_root, tmp_path / "run", source=texture_source, iterations=40, batch_size=8, afs_batches=2)
    model_dir = train(config)
    metrics = evaluate(model_dir, data_root, categories=["widget"], progress=False)["widget"]
    assert metrics["image_auroc"] >= 0.75, metrics
    assert metrics["pixel_auroc"] >= 0.8, metrics


class _Interrupt(Exception):
    pass


def test_clean_feature_cache_gives_the_same_weights_as_recomputing(data_root, tmp_path, reset_accelerate):
    cached = train(tiny_config(data_root, tmp_path / "cached", iterations=6))
    reset_accelerate()
    recomputed = train(tiny_config(data_root, tmp_path / "recomputed", iterations=6, feature_cache_mb=0))
    a, b = load_file(str(cached / "model.safetensors")), load_file(str(recomputed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_resume_after_interruption_continues_to_the_same_weights(data_root, tmp_path, reset_accelerate):
    straight = train(tiny_config(data_root, tmp_path / "straight", iterations=6, checkpoint_every=2))

    def stop_at_five(model, iteration):
        if iteration == 5:
            raise _Interrupt()
        return {}

    config = tiny_config(data_root, tmp_path / "resumed", iterations=6, checkpoint_every=2)
    with pytest.raises(_Interrupt):
        train(config, evaluate=stop_at_five, evaluate_every=1)
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert checkpoints[-1] == "step_000004"

    reset_accelerate()
    with pytest.raises(InputError, match="`resume=True`"):
        train(config)
    reset_accelerate()
    resumed = train(tiny_config(data_root, tmp_path / "resumed", iterations=6, checkpoint_every=2, resume=True))
    log = [json.loads(line) for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    # records written after the checkpoint (iteration 5 before the interruption) are not kept twice
    assert [r["iteration"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key

    reset_accelerate()
    with pytest.raises(InputError, match="`overwrite=True`"):
        train(tiny_config(data_root, tmp_path / "resumed", iterations=6))
    reset_accelerate()
    with pytest.raises(InputError, match="unknown recipe"):  # bad settings are refused before anything is deleted
        train(tiny_config(data_root, tmp_path / "resumed", iterations=6, overwrite=True, recipe="turbo"))
    assert (resumed / "model.safetensors").is_file() and (tmp_path / "resumed" / "checkpoints").is_dir()


def _interrupt_at_three(data_root: Path, out: Path) -> dict:
    """A 5-iteration run killed after iteration 3 (last checkpoint: 2); its config.json record."""
    def stop_at_three(model, iteration):
        if iteration == 3:
            raise _Interrupt()
        return {}

    with pytest.raises(_Interrupt):
        train(tiny_config(data_root, out, iterations=5, checkpoint_every=2), evaluate=stop_at_three, evaluate_every=1)
    return json.loads((out / "config.json").read_text())


def test_resume_continues_with_the_recipe_the_run_recorded(data_root, tmp_path, reset_accelerate):
    """A run started under other defaults of its named recipe (or before a field existed) resumes
    with the recipe it recorded, not with today's defaults of that name."""
    out = tmp_path / "run"
    record = _interrupt_at_three(data_root, out)
    assert record["recipe"]["reconstruction_weight"] == 1.0 and record["recipe"]["mask_shape"] == "perlin"
    record["recipe"]["reconstruction_weight"] = 0.0  # as if "fast" had had another default when the run began
    del record["recipe"]["mask_shape"]  # and as if the field had not existed yet
    record["recipe"]["a_field_since_removed"] = 1
    (out / "config.json").write_text(json.dumps(record))

    reset_accelerate()
    train(tiny_config(data_root, out, iterations=5, checkpoint_every=2, resume=True))
    finished = json.loads((out / "config.json").read_text())
    assert finished["status"] == "finished"
    assert finished["recipe"]["reconstruction_weight"] == 0.0 and finished["recipe"]["mask_shape"] == "perlin"
    assert "a_field_since_removed" not in finished["recipe"]
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = {r["iteration"]: r for r in steps if "loss" in r}
    assert all(steps[i]["loss"] > steps[i]["segmentation"] for i in (1, 2))  # before: both terms
    for i in (3, 4, 5):  # after the resume: the recorded weight, not today's default of 1
        assert steps[i]["reconstruction"] > 0 and steps[i]["loss"] == pytest.approx(steps[i]["segmentation"])


def test_resume_refuses_a_recorded_recipe_it_cannot_use(data_root, tmp_path, reset_accelerate):
    out = tmp_path / "run"
    record = _interrupt_at_three(data_root, out)
    record["recipe"]["optimizer"] = "sgd"
    (out / "config.json").write_text(json.dumps(record))
    reset_accelerate()
    with pytest.raises(InputError, match="optimizer 'sgd'") as info:
        train(tiny_config(data_root, out, iterations=5, checkpoint_every=2, resume=True))
    assert "\n" not in str(info.value)
    del record["recipe"]["name"]
    (out / "config.json").write_text(json.dumps(record))
    reset_accelerate()
    with pytest.raises(InputError, match="unusable recorded recipe"):
        train(tiny_config(data_root, out, iterations=5, checkpoint_every=2, resume=True))


def test_overwrite_deletes_only_what_the_run_recorded_writing(data_root, tmp_path, reset_accelerate):
    out = tmp_path / "run"
    train(tiny_config(data_root, out, iterations=3, checkpoint_every=2))
    recorded = json.loads((out / ".run-outputs.json").read_text())
    assert recorded["entries"] == sorted(["checkpoints", "config.json", "model", "train_log.jsonl"])
    (out / "notes.txt").write_text("the user's notes")
    (out / "best").mkdir()  # the layout's name, but this run (select="last") never wrote it
    (out / "best" / "mine.txt").write_text("the user's own best/")

    reset_accelerate()
    train(tiny_config(data_root, out, iterations=3, checkpoint_every=0, overwrite=True))
    assert (out / "notes.txt").read_text() == "the user's notes"
    assert (out / "best" / "mine.txt").read_text() == "the user's own best/"
    assert not (out / "checkpoints").exists()  # the first run's, deleted; this run writes none
    assert json.loads((out / ".run-outputs.json").read_text())["entries"] == ["config.json", "model", "train_log.jsonl"]

    reset_accelerate()  # a run that would write into the user's best/ is refused before anything is deleted
    with pytest.raises(InputError, match="would replace best, which no recorded training run wrote") as info:
        train(tiny_config(data_root, out, iterations=3, select="best", overwrite=True))
    assert "\n" not in str(info.value)
    assert (out / "model" / "model.safetensors").is_file() and (out / "best" / "mine.txt").is_file()


def _assert_only_training_images_were_read(opened: list[str], category: Path) -> None:
    inside = [Path(p).relative_to(category) for p in opened if Path(p).is_relative_to(category)]
    assert any(p.parts[0] == "train" for p in inside), "the recorder saw no training image"
    assert not [p for p in inside if p.parts[0] != "train"], "training opened test images or masks"


def test_best_checkpoint_is_chosen_on_held_out_training_images_never_on_test(data_root, tmp_path, monkeypatch,
                                                                            opened_files):
    data_root = poisoned_test_split(data_root, tmp_path / "data")
    opened_files.clear()  # from here on: what training opens
    # the earlier validation scores higher, so "best" must differ from "last"
    original_metrics = realnet_training.validation_metrics
    scores = iter([0.9, 0.4])

    def scripted_metrics(*args, **kwargs):
        metrics = original_metrics(*args, **kwargs)
        return {**metrics, "val_score": next(scores)}

    weights: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(model, iteration):  # the weights that would be saved at this iteration (EMA applied)
        weights[iteration] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {}

    monkeypatch.setattr(realnet_training, "validation_metrics", scripted_metrics)
    model_dir = train(tiny_config(data_root, tmp_path / "run", iterations=4, validate_every=2, select="best"),
                      evaluate=snapshot, evaluate_every=2)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    validations = [r for r in log if "val_score" in r]
    assert [(r["iteration"], r["val_score"]) for r in validations] == [(2, 0.9), (4, 0.4)]
    selected = json.loads((model_dir / "thresholds.json").read_text())["selected"]
    assert selected == {"rule": "best", "iteration": 2}
    saved = load_file(str(model_dir / "model.safetensors"))
    assert all(torch.equal(saved[k], weights[2][k]) for k in saved)
    assert not all(torch.equal(saved[k], weights[4][k]) for k in saved)
    _assert_only_training_images_were_read(opened_files, data_root / "widget")


def test_unified_training_on_several_categories(tmp_path):
    root = tmp_path / "data"
    make_dataset(root / "alpha", n_train=6, n_good=1, n_bad=1, seed=1)
    make_dataset(root / "beta", n_train=6, n_good=1, n_bad=1, seed=2)
    model_dir = train(tiny_config(root, tmp_path / "run", categories=["alpha", "beta"], iterations=2))
    thresholds = json.loads((model_dir / "thresholds.json").read_text())
    assert thresholds["calibration_images"] == 4  # 2 held out per category


def test_balance_categories_gives_the_sampler_each_category_size(tmp_path, monkeypatch):
    import realnet.training as training

    root = tmp_path / "data"
    make_dataset(root / "alpha", n_train=4, n_good=1, n_bad=1, seed=1)
    make_dataset(root / "beta", n_train=12, n_good=1, n_bad=1, seed=2)
    built = []

    class Spy(training.BalancedBatchSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(training, "BalancedBatchSampler", Spy)
    train(tiny_config(root, tmp_path / "run", categories=["alpha", "beta"], iterations=2))  # fast: on by default
    assert [s.groups for s in built] == [[2, 9]]  # the training images left after the validation hold-out
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["recipe"]
    assert recorded["balance_categories"] is True
    train(tiny_config(root, tmp_path / "off", categories=["alpha", "beta"], iterations=1,
                      recipe_overrides={"balance_categories": False}))
    assert built[-1].groups is None


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(categories=["missing"]), "no such category folder"),
        (dict(backbone="not_a_backbone"), "backbone"),
        (dict(model_kwargs=dict(TINY_MODEL, afs_channels=[8, 999])), "afs_channels"),
        (dict(recipe="turbo"), "unknown recipe"),
        (dict(recipe="fast-no-loss-weights"), "unknown recipe"),
        (dict(model_kwargs=dict(TINY_MODEL, no_such_setting=1)), "no_such_setting"),
        (dict(model_kwargs=dict(TINY_MODEL, recon_num_res_blocks="two")), "`model_kwargs`"),
        (dict(recipe_overrides={"ema_decay": "high"}), "ema_decay"),
        (dict(mixed_precision="fp16"), "fp16"),
        (dict(batch_size=0), "`batch_size`"),
        (dict(source="dtd:/no/such/folder"), "folder"),
        (dict(select="best", validation_fraction=0.0), "`select='best'`"),
    ],
)
def test_bad_training_inputs_are_one_line_errors(data_root, tmp_path, changes, message):
    with pytest.raises(InputError, match=message) as info:
        train(tiny_config(data_root, tmp_path / "run", **changes))
    assert "\n" not in str(info.value)


def test_empty_or_corrupt_training_images_are_input_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "widget" / "train" / "good").mkdir(parents=True)
    with pytest.raises(InputError):
        train(tiny_config(empty, tmp_path / "run1"))
    corrupt = make_dataset(tmp_path / "corrupt" / "widget", n_train=4, n_good=1, n_bad=1)
    (corrupt / "train" / "good" / "001.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="001.png"):
        train(tiny_config(tmp_path / "corrupt", tmp_path / "run2", validation_fraction=0.0))


def test_kill_then_resume_tolerates_a_torn_log_line_and_refuses_a_tampered_checkpoint(data_root, tmp_path, reset_accelerate):
    import pickle

    class PlantsAFile:
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "planted.txt", "code ran"))

    def stop_at_three(model, iteration):
        if iteration == 3:
            raise _Interrupt()
        return {}

    out = tmp_path / "run"
    with pytest.raises(_Interrupt):
        train(tiny_config(data_root, out, iterations=4, checkpoint_every=2), evaluate=stop_at_three, evaluate_every=1)
    with open(out / "train_log.jsonl", "a") as log:
        log.write('{"iteration": 4, "loss": 0.')  # what a kill in the middle of a write leaves
    checkpoint = out / "checkpoints" / "step_000002"
    original = (checkpoint / "optimizer.safetensors").read_bytes()
    for name in ("optimizer.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl"):
        (checkpoint / name).write_bytes(pickle.dumps(PlantsAFile()))
    reset_accelerate()
    with pytest.raises(InputError, match="optimizer.safetensors: not a valid checkpoint file") as info:
        train(tiny_config(data_root, out, iterations=4, checkpoint_every=2, resume=True))
    assert "\n" not in str(info.value) and not (tmp_path / "planted.txt").exists()

    (checkpoint / "optimizer.safetensors").write_bytes(original)
    reset_accelerate()
    train(tiny_config(data_root, out, iterations=4, checkpoint_every=2, resume=True))
    assert not (tmp_path / "planted.txt").exists()  # the accelerate-style pickles are never read
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if "loss" in r] == [1, 2, 3, 4]


def test_resume_without_a_run_or_with_a_damaged_record_is_a_one_line_error(data_root, tmp_path):
    (tmp_path / "empty").mkdir()
    for output in (tmp_path / "new", tmp_path / "empty"):
        with pytest.raises(InputError, match="no training run to resume") as info:
            train(tiny_config(data_root, output, resume=True))
        assert "\n" not in str(info.value)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for content, message in (('{"status": "runn', "not a readable"), ('{"status": "running"}', "no training settings")):
        (damaged / "config.json").write_text(content)
        with pytest.raises(InputError, match=message) as info:
            train(tiny_config(data_root, damaged, resume=True))
        assert "\n" not in str(info.value)


def test_a_run_stopped_by_a_corrupt_image_can_be_run_again(tmp_path, reset_accelerate):
    data = tmp_path / "data"
    folder = make_dataset(data / "widget", n_train=4, n_good=1, n_bad=1)
    good = (folder / "train" / "good" / "001.png").read_bytes()
    (folder / "train" / "good" / "001.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="001.png"):
        train(tiny_config(data, tmp_path / "run", validation_fraction=0.0, iterations=2))
    (folder / "train" / "good" / "001.png").write_bytes(good)
    reset_accelerate()
    model_dir = train(tiny_config(data, tmp_path / "run", validation_fraction=0.0, iterations=2))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["status"] == "finished"
    assert (model_dir / "model.safetensors").is_file()


def test_resume_from_any_checkpoint_ends_with_the_uninterrupted_weights(data_root, tmp_path, monkeypatch, reset_accelerate):
    # a cache budget of about 4 of the 9 training images: which ones are cached must not depend on
    # where the run (re)started, or the resumed run computes other targets in other batches
    cached: dict[str, list[int]] = {}
    current = {"run": ""}
    original = realnet_training.CleanFeatureCache.features

    def recording(self, model, keys, clean_images):
        out = original(self, model, keys, clean_images)
        cached[current["run"]] = sorted(self.store)
        return out

    monkeypatch.setattr(realnet_training.CleanFeatureCache, "features", recording)
    settings = dict(iterations=8, checkpoint_every=2, feature_cache_mb=0.05)
    current["run"] = "straight"
    straight = load_file(str(train(tiny_config(data_root, tmp_path / "straight", **settings)) / "model.safetensors"))
    assert 0 < len(cached["straight"]) < 9
    for stop in (3, 7):  # resume from the checkpoints of iterations 2 and 6

        def interrupt(model, iteration, stop=stop):
            if iteration == stop:
                raise _Interrupt()
            return {}

        out = tmp_path / f"stopped_at_{stop}"
        current["run"] = "interrupted"
        reset_accelerate()
        with pytest.raises(_Interrupt):
            train(tiny_config(data_root, out, **settings), evaluate=interrupt, evaluate_every=1)
        current["run"] = f"resumed_{stop}"
        reset_accelerate()
        resumed = load_file(str(train(tiny_config(data_root, out, resume=True, **settings)) / "model.safetensors"))
        assert cached[f"resumed_{stop}"] == cached["straight"]
        assert resumed.keys() == straight.keys()
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=f"{key}, resumed at {stop}")
