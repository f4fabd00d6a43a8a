"""Model/dataset cards render from the shipped templates with real facts; CLI entry points work offline."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import DatasetCard, ModelCard
from PIL import Image
from typer.testing import CliRunner

from realnet.cards import TEMPLATE_PATH, render_realnet_card, write_realnet_card
from sia.cards import (
    CARD_TEMPLATES,
    dataset_facts,
    render_dataset_card,
    render_model_card,
    template_path,
    write_model_card,
)
from sia.categories import DATASET_CATEGORIES
from sia.errors import InputError

sys.path.insert(0, str(Path(__file__).parent))
from official_adm import OfficialADM, randomize_  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_CARDS = Path(__file__).parent / "data" / "realnet_cards"


def test_templates_ship_inside_the_package():
    shipped = [(template_path(kind), "sia") for kind in CARD_TEMPLATES] + [(TEMPLATE_PATH, "realnet")]
    for path, package in shipped:
        assert path.is_file() and path.parent == ROOT / package / "assets" / "cards"
        assert path.read_text(encoding="utf-8").startswith("---\n{{ card_data }}\n---")
        assert path.name in (ROOT / "cards" / "README.md").read_text(encoding="utf-8")
    assert set(CARD_TEMPLATES) == {"sdas", "sia"}
    for kind in ("nope", "realnet"):
        with pytest.raises(InputError):
            template_path(kind)
    with pytest.raises(InputError, match="realnet.cards"):
        render_model_card("realnet")


# The facts behind tests/data/realnet_cards/<name>.md: cards rendered before the RealNet card moved
# from sia.cards to realnet.cards, which must still come out the same.
REALNET_CARD_FACTS = {
    "full": dict(repo_id="acme/realnet-bottle", revision="v1", dataset="MVTec-AD", category="bottle",
                 metrics={"image_auroc": 0.99612, "pixel_auroc": 0.9871, "pro": 0.93, "custom_metric": 0.5},
                 eval_split="test", training={"recipe": "fast", "iterations": 300, "lr": 0.0001, "sizes": [1, 2.5]},
                 architecture={"layers": [2, 3], "none": None}, backbone="tf_efficientnet_lite0",
                 image_size=[256, 320], source="trained with `realnet train`", tags=["extra", "realnet"],
                 base_model="timm/tf_efficientnet_lite0", datasets=["acme/sia-mvtec-ad"], model_name="bottle-net"),
    "bare": {},
    "custom": dict(dataset="my-factory", license="apache-2.0", category="widget", metrics={"pixel_auroc": 97.9},
                   image_size=192, title="A custom title"),
    "unlicensed": dict(dataset="my-factory", category="widget"),
    "visa": dict(dataset="visa", category="pcb1", repo_id="acme/pcb1"),
}


@pytest.mark.parametrize("name", sorted(REALNET_CARD_FACTS))
def test_realnet_card_renders_as_before(name, tmp_path):
    """The text byte for byte; the front matter as data (its YAML layout is huggingface_hub's)."""
    expected = (EXPECTED_CARDS / f"{name}.md").read_text(encoding="utf-8")
    text = str(render_realnet_card(**REALNET_CARD_FACTS[name]))
    assert text.split("\n---\n", 1)[1] == expected.split("\n---\n", 1)[1]
    assert ModelCard(text).data.to_dict() == ModelCard(expected).data.to_dict()
    (tmp_path / "model").mkdir()
    written = write_realnet_card(tmp_path / "model", **REALNET_CARD_FACTS[name])
    assert written.read_text(encoding="utf-8") == text


def test_realnet_card_carries_measured_metrics():
    from realnet.metrics import image_auroc

    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 20)
    scores = labels * 0.6 + rng.random(40)
    auroc = image_auroc(scores, labels)
    assert 0.5 < auroc < 1.0
    card = render_realnet_card(repo_id="acme/realnet-bottle", dataset="MVTec-AD", category="bottle",
                               metrics={"image_auroc": auroc}, training={"recipe": "fast", "iterations": 300},
                               revision="v1")
    parsed = ModelCard(str(card))
    assert parsed.data.license == "cc-by-nc-sa-4.0" and parsed.data.library_name == "realnet"
    result = parsed.data.eval_results[0]
    assert result.metric_type == "image_auroc" and result.metric_value == pytest.approx(auroc, abs=1e-6)
    assert result.dataset_config == "bottle" and result.dataset_split == "test"
    text = str(card)
    assert f"| Image AUROC | {100 * auroc:.1f} |" in text
    assert 'RealNet.from_pretrained("acme/realnet-bottle", revision="v1")' in text
    assert "zhang2024realnet" in text and "Ximiao" in text and "| iterations | 300 |" in text


def test_unevaluated_card_says_so_and_percentages_convert():
    text = str(render_realnet_card(dataset="visa", category="pcb1"))
    assert "has not been evaluated" in text and "model-index" not in text and "zou2022spot" in text
    card = ModelCard(str(render_realnet_card(dataset="btad", metrics={"pixel_auroc": 97.9})))
    assert card.data.eval_results[0].metric_value == pytest.approx(0.979)
    with pytest.raises(InputError):
        render_realnet_card(metrics={"pro": 250})
    with pytest.raises(InputError, match="does not exist"):
        write_realnet_card(Path("absent-model-folder"), metrics={"pro": 0.5})


def test_licence_follows_the_source_data():
    assert dataset_facts("mpdd")["license"] == "cc-by-nc-sa-4.0"
    with pytest.raises(InputError, match="cannot be released as mit"):
        dataset_facts("mvtec-ad", license="mit")
    custom = dataset_facts("my-factory")
    assert custom["license"] == "other" and "source images" in custom["licence_text"]
    assert dataset_facts("my-factory", license="apache-2.0")["license"] == "apache-2.0"


def test_sdas_card_lists_categories_in_class_id_order(tmp_path):
    card = render_model_card("sdas", repo_id="acme/sdas-visa", dataset="visa")
    text = str(card)
    assert ModelCard(text).data.library_name == "diffusers"
    positions = [text.index(f"{i}: `{name}`") for i, name in enumerate(DATASET_CATEGORIES["visa"])]
    assert positions == sorted(positions)


def test_dataset_card_configs_per_category():
    card = render_dataset_card({"01": 10, "02": 1200, "03": 5}, dataset="btad", repo_id="acme/sia-btad")
    data = DatasetCard(str(card)).data
    assert data.license == "cc-by-nc-sa-4.0" and data.size_categories == ["1K<n<10K"]
    assert [c["config_name"] for c in data.configs] == ["01", "02", "03"]
    assert data.configs[1]["data_files"] == [{"split": "train", "path": "data/02/train-*"}]
    assert "mishra2021vtadl" in str(card)


def test_write_model_card_into_a_saved_pipeline(tmp_path):
    from sia.pipeline import SDASPipeline

    pipe = SDASPipeline.from_unet_preset("tiny-32", ["bottle", "cable"])
    pipe.save_pretrained(tmp_path / "pipe")
    path = write_model_card(tmp_path / "pipe", "sdas", categories=pipe.categories, image_size=32,
                            training={"steps": 10, "batch_size": 2})
    card = ModelCard.load(path)
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert "| steps | 10 |" in card.text and "0: `bottle`, 1: `cable`" in card.text
    with pytest.raises(InputError):
        write_model_card(tmp_path / "absent", "sdas", categories=["a"])


# ------------------------------------------------------------------ CLI commands (offline)


def test_cli_push_stage_only_and_convert_official_sia(tmp_path):
    from sia.cli import app
    from sia.hub import load_sia

    official = tmp_path / "MVTec-AD" / "sdas"
    rng = np.random.default_rng(0)
    for category in ("bottle", "zipper"):
        (official / category).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(official / category / f"rank0_{i}.jpg")
    runner = CliRunner()
    result = runner.invoke(app, ["convert-official", str(official), str(tmp_path / "sia"), "--dataset", "mvtec-ad"])
    assert result.exit_code == 0, result.output
    ds = load_sia(tmp_path / "sia", category="zipper")
    assert len(ds) == 2 and ds["strength"] == [None, None]
    assert (tmp_path / "sia" / "zipper" / "rank0_1.jpg").read_bytes() == (official / "zipper" / "rank0_1.jpg").read_bytes()

    result = runner.invoke(app, ["push", str(tmp_path / "sia"), "--repo-id", "acme/sia-mvtec", "--stage-only",
                                 str(tmp_path / "stage")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "stage" / "data" / "zipper" / "train-00000-of-00001.parquet").is_file()
    # huggingface_hub >= 1.0 installs `hf`, not `huggingface-cli`
    assert f"`hf upload acme/sia-mvtec {tmp_path / 'stage'} --repo-type dataset" in result.output
    assert "huggingface-cli" not in result.output

    before = sorted(p.relative_to(tmp_path / "sia") for p in (tmp_path / "sia").rglob("*"))
    for inside in (tmp_path / "sia", tmp_path / "sia" / "stage", tmp_path):
        refused = runner.invoke(app, ["push", str(tmp_path / "sia"), "--repo-id", "acme/sia-mvtec", "--stage-only",
                                      str(inside), "--overwrite"])
        assert refused.exit_code == 2 and "overlaps the input" in refused.output, refused.output
    assert sorted(p.relative_to(tmp_path / "sia") for p in (tmp_path / "sia").rglob("*")) == before
    card = DatasetCard.load(tmp_path / "stage" / "README.md")
    assert card.data.license == "cc-by-nc-sa-4.0" and "not recorded per image" in card.text

    result = runner.invoke(app, ["convert-official", str(official), str(tmp_path / "other"), "--dataset", "visa"])
    assert result.exit_code == 2 and "not visa categories" in result.output


def test_cli_convert_official_sdas_checkpoint(tmp_path):
    from sia.cli import app
    from sia.pipeline import SDASPipeline

    reference = randomize_(OfficialADM(num_classes=3), torch.Generator().manual_seed(0)).eval()
    path = tmp_path / "btad_diffusion_ckpt_epoch_240.pt"
    torch.save({"epoch": 240, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    result = CliRunner().invoke(app, ["convert-official", str(path), str(tmp_path / "pipe"), "--dataset", "btad",
                                      "--image-size", "16", "--head-channels", "32"])
    assert result.exit_code == 0, result.output
    pipe = SDASPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.categories == ["01", "02", "03"]
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 900]), torch.tensor([2, 0])
    with torch.no_grad():
        assert (pipe.unet(x, t, class_labels=y).sample - reference(x, t, y)).abs().max().item() < 1e-4
    assert "epoch 240" in (tmp_path / "pipe" / "README.md").read_text(encoding="utf-8")

    wrong = CliRunner().invoke(app, ["convert-official", str(path), str(tmp_path / "pipe2"), "--dataset", "mvtec-ad",
                                     "--image-size", "16", "--head-channels", "32"])
    assert wrong.exit_code == 2 and "3 classes but 15 categories" in wrong.output
