"""realnet.hub offline: saved config.json, old configs, checkpoint construction, Hub error lines."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors.torch import save_file

import realnet.model
from realnet import hub
from realnet.construction import check_model_kwargs
from realnet.model import RealNet
from sia.errors import InputError

TINY = dict(backbone="resnet18", backbone_pretrained=False, afs_channels=[16, 24, 32, 16], image_size=64)
SPREAD_INDICES = [torch.arange(16) * 4, torch.arange(24) * 5, torch.arange(32) * 8, torch.arange(16) * 32]


@pytest.fixture(scope="module")
def model() -> RealNet:
    torch.manual_seed(0)
    net = RealNet(**TINY)
    for unet in net.recon.unets:  # non-zero reconstructions, so the maps say something
        torch.nn.init.normal_(unet.out[-1].weight, std=0.05)
    net.selector.set_indices(SPREAD_INDICES)
    return net.eval()


def test_saved_config_is_every_setting_resolved(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    settings = set(inspect.signature(RealNet.__init__).parameters) - {"self", "weights_from_checkpoint"}
    assert saved == model.config and set(saved) == settings
    assert saved["layers"] == [1, 2, 3, 4] and saved["image_size"] == [64, 64] and saved["rrs_top_k"] == [15, 15]
    assert saved["recon_channel_mult"] == [1, 2, 4] and saved["backbone_weights"] is None
    model.config["layers"].append(9)  # a copy: the saved settings cannot be changed by accident
    assert model.config["layers"] == [1, 2, 3, 4]


def test_an_explicit_config_is_saved_as_given(model, tmp_path):
    model.save_pretrained(tmp_path / "m", config={**model.config, "note": "kept"})
    assert json.loads((tmp_path / "m" / "config.json").read_text())["note"] == "kept"


def test_an_older_config_without_newer_settings_loads_and_resaves_with_their_defaults(model, tmp_path):
    model.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    old = json.loads(path.read_text())
    del old["recon_norm_groups"], old["discriminator_residual_layers"]
    old["backbone_pretrained"] = True  # as saved by a run that downloaded the ImageNet weights
    path.write_text(json.dumps(old))
    loaded = RealNet.from_pretrained(tmp_path / "old")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded(images).anomaly_map, model(images).anomaly_map, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again == {**old, "recon_norm_groups": "adaptive", "discriminator_residual_layers": 2}


def test_weights_from_checkpoint_reads_no_backbone_weights_and_is_not_saved(tmp_path):
    missing = str(tmp_path / "nowhere.safetensors")
    with pytest.raises(InputError, match="backbone_weights: file .* does not exist"):
        RealNet(**TINY, backbone_weights=missing)
    empty = RealNet(**TINY, backbone_weights=missing, weights_from_checkpoint=True)
    assert "weights_from_checkpoint" not in empty.config and empty.config["backbone_weights"] is None
    with pytest.raises(InputError, match="weights_from_checkpoint: unknown RealNet setting"):
        check_model_kwargs({"weights_from_checkpoint": True})


def test_construction_follows_its_arguments_even_while_a_model_is_loading(model, tmp_path, monkeypatch):
    """No hidden state: a RealNet built while another one loads gets the backbone its arguments ask for."""
    calls: list[tuple[bool, object]] = []
    real_backbone = realnet.model.Backbone

    def recording_backbone(name, layers, pretrained, weights):
        calls.append((pretrained, weights))
        return real_backbone(name, layers, pretrained=False, weights=None)

    class WithReference(RealNet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.reference = RealNet(**{**TINY, "backbone_pretrained": True})

    monkeypatch.setattr(realnet.model, "Backbone", recording_backbone)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "backbone_pretrained": True}))
    state = dict(model.state_dict())
    state.update({f"reference.{k}": v for k, v in RealNet(**TINY).state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / hub.WEIGHTS_NAME))
    calls.clear()
    WithReference.from_pretrained(folder)
    assert calls == [(False, None), (True, None)]  # the checkpoint's backbone empty, the other one as asked


@pytest.mark.parametrize(
    "error, words",
    [
        (LocalEntryNotFoundError("not cached"), "model.safetensors is not in the local Hub cache"),
        (EntryNotFoundError("404"), "the repo has no model.safetensors"),
        (HFValidationError("Repo id must be in the form\nmore"), "invalid Hub argument (Repo id must be in the form)"),
        (OfflineModeIsEnabled("offline\ndetails"), "cannot get model.safetensors from the Hub (offline)"),
    ],
)
def test_hub_errors_become_one_line_input_errors(error, words):
    with pytest.raises(InputError) as err, hub.hub_errors_as_input_errors("acme/x", None, hub.WEIGHTS_NAME):
        raise error
    message = str(err.value)
    assert message.startswith("pretrained_model_name_or_path: 'acme/x': ") and words in message and "\n" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_other_errors_pass_through_unchanged():
    with pytest.raises(KeyError), hub.hub_errors_as_input_errors("acme/x", None, hub.WEIGHTS_NAME):
        raise KeyError("not a Hub error")
