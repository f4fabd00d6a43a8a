"""Diffusion training: data discovery, loss goes down, exact resume, shape-matched init, CLI end to end."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sia.training as training
from sia.diffusion_data import batch_keys, discover_training_images
from sia.errors import InputError
from sia.training import DiffusionTrainingConfig, load_matching_weights, train_diffusion

# A UNet small enough for hundreds of CPU steps: two levels, 8/16 channels, attention at 8 px.
MICRO_UNET = dict(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=8,
                  norm_num_groups=4, attn_norm_num_groups=4)


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _toy_image(category: int, index: int, size: int = 20) -> Image.Image:
    """A flat category colour with a small square whose place and colour vary per image."""
    rng = np.random.default_rng(100 * category + index)
    array = np.zeros((size, size, 3), np.uint8)
    array[..., category % 3] = 190
    y, x = rng.integers(2, size - 8, 2)
    array[y:y + 6, x:x + 6] = rng.integers(0, 256, 3)
    return Image.fromarray(array)


@pytest.fixture
def toy_data(tmp_path: Path) -> Path:
    """Two categories in MVTec layout (with a test split that must be ignored)."""
    root = tmp_path / "data"
    for c, name in enumerate(["cable", "bottle"]):
        good = root / name / "train" / "good"
        good.mkdir(parents=True)
        for i in range(4):
            _toy_image(c, i).save(good / f"{i:03d}.png")
        (root / name / "test" / "crack").mkdir(parents=True)
        _toy_image(2, 9).save(root / name / "test" / "crack" / "000.png")
    return root


def _config(data: Path, out: Path, **overrides) -> DiffusionTrainingConfig:
    settings = dict(data_dir=str(data), output_dir=str(out), preset="tiny-32", image_size=16,
                    unet_overrides=MICRO_UNET, batch_size=4, learning_rate=2e-3, sample_every=0,
                    checkpoint_every=1000, log_every=1, progress=False, cpu=True)
    settings.update(overrides)
    return DiffusionTrainingConfig(**settings)


@contextlib.contextmanager
def _killed_at_loss_call(monkeypatch, call: int):
    """Within the block, the `call`-th loss computation raises KeyboardInterrupt (a simulated kill)."""
    real_loss, calls = training.hybrid_loss, {"n": 0}

    def dying_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("simulated kill")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "hybrid_loss", dying_loss)
    try:
        yield
    finally:
        monkeypatch.setattr(training, "hybrid_loss", real_loss)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ data


def test_discovery_of_mvtec_generic_and_single_folder_layouts(toy_data: Path, tmp_path: Path):
    names, items = discover_training_images(toy_data)
    assert names == ["bottle", "cable"]  # official MVTec order, not folder order
    assert len(items) == 8 and all("test" not in p.path.parts for p in items)
    assert {i.class_id for i in items if i.path.parts[-4] == "cable"} == {1}

    names, items = discover_training_images(toy_data, ["cable"])
    assert names == ["cable"] and len(items) == 4 and {i.class_id for i in items} == {0}

    generic = tmp_path / "generic"
    for name in ("zeta", "alpha"):
        (generic / name).mkdir(parents=True)
        _toy_image(0, 0).save(generic / name / "a.png")
    assert discover_training_images(generic)[0] == ["alpha", "zeta"]

    single = tmp_path / "widgets"
    single.mkdir()
    _toy_image(0, 1).save(single / "x.jpg")
    assert discover_training_images(single)[0] == ["widgets"]
    assert discover_training_images(toy_data / "bottle")[0] == ["bottle"]

    with pytest.raises(InputError, match="screw"):
        discover_training_images(toy_data, ["bottle", "screw"])
    with pytest.raises(InputError, match="no such folder"):
        discover_training_images(tmp_path / "missing")


def test_batches_cover_each_epoch_once_and_split_across_processes():
    n, batch = 10, 4
    seen = [k for step in range(5) for k, _ in batch_keys(n, batch, step, 0, 1, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # reshuffled per epoch
    for step in range(4):
        whole = batch_keys(n, batch, step, 0, 1, seed=3)
        parts = batch_keys(n, batch, step, 0, 2, seed=3) + batch_keys(n, batch, step, 1, 2, seed=3)
        assert sorted(whole) == sorted(parts)
    assert batch_keys(n, batch, 7, 0, 1, seed=3) == batch_keys(n, batch, 7, 0, 1, seed=3)
    flips = [f for step in range(20) for _, f in batch_keys(n, batch, step, 0, 1, seed=3, horizontal_flip=True)]
    assert 0 < sum(flips) < len(flips)


# ------------------------------------------------------------------ training


def test_training_lowers_the_loss_and_keeps_the_vlb_finite(toy_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    pipeline = train_diffusion(_config(toy_data, out, max_steps=120, sample_every=120, sample_images=4,
                                       sample_inference_steps=3))
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 121))
    first = np.mean([r["loss"] for r in log[:20]])
    last = np.mean([r["loss"] for r in log[-20:]])
    assert last < 0.6 * first, (first, last)
    assert all(np.isfinite(r["vb"]) and r["vb"] >= 0 for r in log)
    assert (pipeline / "model_index.json").is_file()
    grid = Image.open(out / "samples" / "step_000120.png")
    assert grid.size == (4 * 16 + 5 * 2, 3 * 16 + 4 * 2)  # 4 columns, rows s = 0, 0.1, 0.2
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["resolved"]["categories"] == ["bottle", "cable"] and saved["max_steps"] == 120


def test_resume_after_interruption_matches_an_uninterrupted_run(toy_data: Path, tmp_path: Path, monkeypatch):
    settings = dict(max_steps=6, checkpoint_every=2, gradient_accumulation_steps=2, batch_size=2,
                    horizontal_flip=True, ema_decay=0.5)
    train_diffusion(_config(toy_data, tmp_path / "straight", **settings))

    # Kill the second run in the middle of step 4's accumulation (after the step-2 checkpoint... and step 3).
    interrupted = tmp_path / "interrupted"
    with _killed_at_loss_call(monkeypatch, 8), pytest.raises(KeyboardInterrupt):
        train_diffusion(_config(toy_data, interrupted, **settings))
    assert training.latest_checkpoint(interrupted).name == "step_000002"
    assert not (interrupted / "pipeline").exists()

    with pytest.raises(InputError, match="`resume=True`"):
        train_diffusion(_config(toy_data, interrupted, **settings))
    with pytest.raises(InputError, match="learning_rate"):
        train_diffusion(_config(toy_data, interrupted, resume=True, **{**settings, "learning_rate": 1e-3}))

    train_diffusion(_config(toy_data, interrupted, resume=True, **settings))
    assert [r["step"] for r in _log(interrupted)] == list(range(1, 7))
    for relative in ("pipeline/unet/diffusion_pytorch_model.safetensors", "checkpoints/step_000006/model.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / relative)), load_file(str(interrupted / relative))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), relative
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step_000004", "step_000006"]


def test_init_from_copies_matching_tensors_and_reports_skipped_keys(toy_data: Path, tmp_path: Path):
    from diffusers import UNet2DModel

    source_config = training.build_training_unet(_config(toy_data, tmp_path / "x"), num_classes=5).config
    source = UNet2DModel(**{**dict(source_config), "num_class_embeds": 5})
    torch.nn.init.normal_(source.conv_in.weight, std=3.0)
    source.save_pretrained(tmp_path / "source_unet")

    target = training.build_training_unet(_config(toy_data, tmp_path / "x"), num_classes=2)
    report = load_matching_weights(target, source.state_dict(), "source")
    assert list(report["skipped_shape_mismatch"]) == ["class_embedding.weight"]
    assert report["loaded"] == report["target_keys"] - 1 and not report["missing_in_source"]
    assert torch.equal(target.conv_in.weight, source.conv_in.weight)

    out = tmp_path / "init_run"
    pipeline = train_diffusion(_config(toy_data, out, max_steps=1, init_from=str(tmp_path / "source_unet")))
    saved = json.loads((out / "init_report.json").read_text())
    width = source.class_embedding.weight.shape[1]
    assert saved["skipped_shape_mismatch"]["class_embedding.weight"] == {"source": [5, width], "target": [2, width]}
    ema_unet = load_file(str(pipeline / "unet" / "diffusion_pytorch_model.safetensors"))
    # EMA 0.9999 after one update: still the initialisation up to 1e-4 of one Adam step.
    assert torch.allclose(ema_unet["conv_in.weight"], source.conv_in.weight, atol=1e-5)

    with pytest.raises(InputError, match="`init_from`"):
        train_diffusion(_config(toy_data, tmp_path / "bad", max_steps=1, init_from=str(tmp_path / "nothing.safetensors")))


def test_cli_train_writes_a_loadable_pipeline(toy_data: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from sia.cli import app
    from sia.pipeline import SDASPipeline

    out = tmp_path / "cli_run"
    args = ["train", "--data", str(toy_data), "--output", str(out), "--categories", "cable,bottle",
            "--preset", "tiny-32", "--image-size", "16", "--steps", "2", "--batch-size", "2",
            "--sample-every", "2", "--sample-steps", "2", "--checkpoint-every", "1", "--cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out / "pipeline") in result.output
    pipe = SDASPipeline.from_pretrained(out / "pipeline")
    assert pipe.categories == ["cable", "bottle"]
    pipe.set_progress_bar_config(disable=True)
    images = pipe("bottle", num_images=1, num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert (out / "samples" / "step_000002.png").is_file()

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = CliRunner().invoke(app, args[:-1] + ["--mixed-precision", "fp8", "--overwrite"])
    assert bad.exit_code == 2 and "--mixed-precision" in bad.output

    (out / "notes.txt").write_text("the user's own file")
    rerun = CliRunner().invoke(app, [*args, "--overwrite"])
    assert rerun.exit_code == 0, rerun.output
    assert (out / "notes.txt").read_text() == "the user's own file"  # --overwrite deletes only the run's files
    assert (out / "pipeline" / "model_index.json").is_file()


def test_a_run_never_replaces_what_no_run_recorded_writing(toy_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "mine.png").write_bytes(b"the user's picture")
    with pytest.raises(InputError, match="not a training run folder"):
        train_diffusion(_config(toy_data, out, max_steps=1))
    with pytest.raises(InputError, match="would replace samples"):  # not even with overwrite
        train_diffusion(_config(toy_data, out, max_steps=1, overwrite=True))
    assert (out / "samples" / "mine.png").read_bytes() == b"the user's picture"


def test_benchmark_folder_without_a_normal_split_is_refused(tmp_path: Path):
    for layout in ("category_root", "single"):
        root = tmp_path / layout
        category = root / "bottle" if layout == "category_root" else root
        for sub in ("test/crack", "ground_truth/crack", "train/other"):
            (category / sub).mkdir(parents=True)
            _toy_image(0, 0).save(category / sub / "000.png")
        with pytest.raises(InputError, match=r"ground_truth/ but no train/good or train/ok") as info:
            discover_training_images(root)
        assert str(category) in str(info.value) and "\n" not in str(info.value)


def test_sample_inference_steps_are_bounded_by_the_training_timesteps(toy_data: Path, tmp_path: Path):
    _config(toy_data, tmp_path / "ok", sample_inference_steps=1000).validate()
    with pytest.raises(InputError, match="sample_inference_steps.*1000"):
        train_diffusion(_config(toy_data, tmp_path / "run", sample_inference_steps=1001))
    assert not (tmp_path / "run").exists()


def test_resume_refuses_another_world_size_or_precision_and_skips_a_torn_log_line(toy_data: Path, tmp_path: Path, reset_accelerate):
    out = tmp_path / "run"
    train_diffusion(_config(toy_data, out, max_steps=2, checkpoint_every=1))
    state_path = training.latest_checkpoint(out) / "trainer_state.json"
    state = json.loads(state_path.read_text())
    assert state == {"step": 2, "num_processes": 1}

    state_path.write_text(json.dumps({**state, "num_processes": 2}))
    with pytest.raises(InputError, match=r"with 2 processes but this launch has 1") as info:
        train_diffusion(_config(toy_data, out, max_steps=3, checkpoint_every=1, resume=True))
    assert "\n" not in str(info.value)
    state_path.write_text(json.dumps(state))
    reset_accelerate()  # a fresh process could pick another precision
    with pytest.raises(InputError, match=r"mixed_precision 'no' -> 'bf16'"):
        train_diffusion(_config(toy_data, out, max_steps=3, checkpoint_every=1, resume=True, mixed_precision="bf16"))

    with open(out / "train_log.jsonl", "a") as log:
        log.write('{"step": 3, "loss": 0.')  # killed in the middle of a write
    reset_accelerate()
    train_diffusion(_config(toy_data, out, max_steps=3, checkpoint_every=1, resume=True))
    assert [r["step"] for r in _log(out)] == [1, 2, 3]


# ------------------------------------------------------------------ EMA and clipping


def test_ema_update_moves_by_one_minus_decay_and_converges_to_the_model():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = training.EMAWeights(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0 + torch.randn_like(p))
        model[1].running_mean.fill_(7.0)
    ema.update(model)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ema.shadow[name], (start[name] + param) / 2)
    assert torch.equal(ema.shadow["1.running_mean"], torch.full((2,), 7.0))  # buffers are copied
    assert all(not p.requires_grad for p in ema.model.parameters()) and not ema.model.training

    slow = training.EMAWeights(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0)
    gaps = []
    for _ in range(200):
        slow.update(model)
        gaps.append(max((slow.shadow[n] - p).abs().max().item() for n, p in model.named_parameters()))
    assert gaps[-1] < 1e-6 * max(1.0, gaps[0]) and gaps[1] == pytest.approx(0.9 * gaps[0], rel=1e-4)


def _gradient_norms_at_each_update(config: DiffusionTrainingConfig) -> list[float]:
    """The global gradient norm the optimizer sees at every real update of a run."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    norms: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)
    try:
        train_diffusion(config)
    finally:
        handle.remove()
    return norms


def test_gradients_are_clipped_to_max_grad_norm_before_each_update(toy_data: Path, tmp_path: Path):
    limit = 1e-3
    unclipped = _gradient_norms_at_each_update(_config(toy_data, tmp_path / "free", max_steps=3, max_grad_norm=0.0))
    assert len(unclipped) == 3 and min(unclipped) > 10 * limit  # so the clipped run below is a real test
    clipped = _gradient_norms_at_each_update(_config(toy_data, tmp_path / "clip", max_steps=3, max_grad_norm=limit,
                                                     gradient_accumulation_steps=2))
    assert len(clipped) == 3 and all(limit * 0.99 < n <= limit * (1 + 1e-4) for n in clipped), clipped


def test_fp16_on_the_cpu_is_refused_as_realnet_train_refuses_it(toy_data: Path, tmp_path: Path):
    with pytest.raises(InputError, match="`mixed_precision='fp16'`: needs a GPU") as info:
        train_diffusion(_config(toy_data, tmp_path / "run", max_steps=1, mixed_precision="fp16", cpu=True))
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


def test_a_moved_run_resumes(toy_data: Path, tmp_path: Path, monkeypatch, reset_accelerate):
    with _killed_at_loss_call(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        train_diffusion(_config(toy_data, tmp_path / "before", max_steps=3, checkpoint_every=1))
    (tmp_path / "before").rename(tmp_path / "after")
    reset_accelerate()
    train_diffusion(_config(toy_data, tmp_path / "after", max_steps=3, checkpoint_every=1, resume=True))
    assert [r["step"] for r in _log(tmp_path / "after")] == [1, 2, 3]
    assert json.loads((tmp_path / "after" / "training_config.json").read_text())["output_dir"] == str(tmp_path / "after")


def test_a_run_stopped_by_a_corrupt_image_can_be_run_again(toy_data: Path, tmp_path: Path, reset_accelerate):
    image = toy_data / "cable" / "train" / "good" / "001.png"
    good = image.read_bytes()
    image.write_bytes(b"not a png")
    with pytest.raises(InputError, match="001.png"):
        train_diffusion(_config(toy_data, tmp_path / "run", max_steps=2))
    image.write_bytes(good)
    reset_accelerate()
    assert train_diffusion(_config(toy_data, tmp_path / "run", max_steps=2)).is_dir()


def test_a_tampered_checkpoint_is_refused_without_running_code(toy_data: Path, tmp_path: Path, reset_accelerate):
    import pickle

    class PlantsAFile:
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "planted.txt", "code ran"))

    out = tmp_path / "run"
    train_diffusion(_config(toy_data, out, max_steps=1, checkpoint_every=1))
    (training.latest_checkpoint(out) / "ema.safetensors").write_bytes(pickle.dumps(PlantsAFile()))
    reset_accelerate()
    with pytest.raises(InputError, match="ema.safetensors: not a valid checkpoint file") as info:
        train_diffusion(_config(toy_data, out, max_steps=2, checkpoint_every=1, resume=True))
    assert "\n" not in str(info.value) and not (tmp_path / "planted.txt").exists()


def test_cpu_adam_is_fused_and_follows_the_adam_formula():
    """The fused CPU kernel must keep Adam's arithmetic (bias-corrected moments, weight decay in the gradient)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2))
    reference = [p.detach().clone() for p in model.parameters()]
    optimizer = training.make_adam(model.parameters(), "cpu", lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    assert optimizer.param_groups[0]["fused"] is True
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in reference]
    for step in range(1, 6):
        grads = [torch.randn(p.shape) for p in reference]
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        for i, (p, g) in enumerate(zip(reference, grads, strict=True)):
            g = g + 0.1 * p
            m, v = 0.8 * moments[i][0] + 0.2 * g, 0.99 * moments[i][1] + 0.01 * g * g
            moments[i] = (m, v)
            p -= 1e-2 * (m / (1 - 0.8**step)) / ((v / (1 - 0.99**step)).sqrt() + 1e-8)
    for p, expected in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5)
    assert training.make_adam(torch.nn.Linear(2, 2).parameters(), "meta", lr=1e-3).param_groups[0]["fused"] is None


def test_a_run_started_with_an_earlier_preset_layout_resumes_with_it(toy_data: Path, tmp_path: Path, monkeypatch,
                                                                      reset_accelerate, capsys):
    # small-64 changed layout once; a run interrupted before such a change must still resume.
    import sia.unets as unets

    earlier = unets._adm_config(32, (32, 64), (False, False), 1, 32, 8)  # tiny-32 without its attention
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setitem(unets.UNET_PRESETS, "tiny-32", earlier)
        with _killed_at_loss_call(patch, 2), pytest.raises(KeyboardInterrupt):
            train_diffusion(_config(toy_data, out, unet_overrides=None, max_steps=2, checkpoint_every=1))
    reset_accelerate()
    with pytest.raises(InputError, match="does not fit this run") as info:  # layout unknown: one line
        train_diffusion(_config(toy_data, out, unet_overrides=None, max_steps=2, checkpoint_every=1, resume=True))
    assert "\n" not in str(info.value)
    reset_accelerate()
    monkeypatch.setitem(training.EARLIER_PRESET_LAYOUTS, "tiny-32", (earlier,))
    pipeline = train_diffusion(_config(toy_data, out, unet_overrides=None, max_steps=2, checkpoint_every=1, resume=True))
    assert "earlier layout of preset 'tiny-32'" in capsys.readouterr().out
    assert [r["step"] for r in _log(out)] == [1, 2]
    saved = json.loads((Path(pipeline) / "unet" / "config.json").read_text())
    assert saved["down_block_types"] == list(earlier["down_block_types"])
