"""Convert official RealNet checkpoints (`ckpt_best.pth.tar` of cnulab/RealNet) to `RealNet`.

An official checkpoint is `{epoch, arch, state_dict, best_metric}`; its state dict holds the whole
model: the timm backbone (`backbone.feature_extractor.*`), the AFS channel indices
(`afs.indexes.block<i>_layer<j>`), one reconstruction U-Net per block
(`recon.block<i>_recon.*`), and RRS with its ranking BatchNorm running statistics
(`rrs.bn_idx.*`) and the segmentation decoder (`rrs.decoder1..3.*`). The mapping is a pure
renaming (no tensor is changed); entries only this implementation has (input normalisation
constants, the optional feature standardiser, the AFS "ready" flag) keep their neutral values,
so the converted model computes what the official model computes.

Read with `torch.load(weights_only=True)` only (`sia.convert.load_official_checkpoint`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sia.convert import describe_key_mismatch, load_official_checkpoint
from sia.errors import InputError

__all__ = [
    "official_to_realnet_key",
    "realnet_to_official_key",
    "official_to_realnet_state_dict",
    "realnet_to_official_state_dict",
    "infer_realnet_config",
    "convert_official_realnet",
]

# Keys that exist only in this implementation, with the value they take after conversion.
_OURS_ONLY = re.compile(r"^(backbone\.(mean|std)|standardizer\..*|selector\.ready)$")

_RESBLOCK_NAMES = [("in_layers.0.", "norm."), ("in_layers.2.", "conv."), ("skip_connection.", "skip."),
                   ("h_upd.conv.", "h_upsample."), ("x_upd.conv.", "x_upsample.")]


def _block_number(name: str) -> int:
    match = re.fullmatch(r"block(\d+)", name)
    if match is None:
        raise InputError(f"official block name {name!r}: expected block<N>")
    return int(match.group(1)) - 1


def _recon_to_ours(rest: str) -> str:
    # The official down-sampling ResBlocks sit directly in input_blocks (not in a Sequential).
    rest = re.sub(r"^input_blocks\.(\d+)\.(in_layers|skip_connection|h_upd|x_upd)\.", r"input_blocks.\1.0.\2.", rest)
    for official, ours in _RESBLOCK_NAMES:
        rest = rest.replace(official, ours)
    return rest


def _recon_to_official(rest: str, down_blocks: set[int], resblocks: set[str]) -> str:
    """`rest` is a key inside one reconstruction U-Net; `resblocks` are the module paths of its ResBlocks."""
    module, _, param = rest.rpartition(".")
    owner, _, attribute = module.rpartition(".")
    if owner in resblocks:
        renamed = {ours.rstrip("."): official.rstrip(".") for official, ours in _RESBLOCK_NAMES}.get(attribute)
        if renamed is None:
            raise InputError(f"{rest}: unknown ResBlock parameter")
        rest = f"{owner}.{renamed}.{param}"
    match = re.match(r"^input_blocks\.(\d+)\.0\.", rest)
    if match and int(match.group(1)) in down_blocks:
        rest = f"input_blocks.{match.group(1)}." + rest[match.end():]
    return rest


def official_to_realnet_key(key: str, layer_blocks: Mapping[str, int] | None = None) -> str | None:
    """The `RealNet` state-dict key of an official key, or None when it has no counterpart."""
    if key.startswith("backbone.feature_extractor."):
        return "backbone.model." + key[len("backbone.feature_extractor."):]
    match = re.fullmatch(r"afs\.indexes\.(block\d+)_(\w+)", key)
    if match:
        return f"selector.indices_{_block_number(match.group(1))}"
    match = re.match(r"recon\.(block\d+)_recon\.(.+)$", key)
    if match:
        return f"recon.unets.{_block_number(match.group(1))}.{_recon_to_ours(match.group(2))}"
    if key.startswith("rrs.bn_idx."):
        return "rrs.bn." + key[len("rrs.bn_idx."):]
    match = re.match(r"rrs\.(decoder\d\..+)$", key)
    if match:
        rest = match.group(1).replace("._layers.", ".layers.").replace("._block.", ".block.")
        return "discriminator." + rest
    return None


def realnet_to_official_key(key: str, layers: list[str], down_blocks: set[int], resblocks: set[str]) -> str | None:
    """Inverse of `official_to_realnet_key`; `layers` names the backbone layer of each block
    (e.g. ["layer1", ..., "layer4"]), `down_blocks` the input-block indices of down-sampling
    ResBlocks and `resblocks` the module paths of the ResBlocks inside a reconstruction U-Net."""
    if key.startswith("backbone.model."):
        return "backbone.feature_extractor." + key[len("backbone.model."):]
    match = re.fullmatch(r"selector\.indices_(\d+)", key)
    if match:
        i = int(match.group(1))
        return f"afs.indexes.block{i + 1}_{layers[i]}"
    match = re.match(r"recon\.unets\.(\d+)\.(.+)$", key)
    if match:
        return f"recon.block{int(match.group(1)) + 1}_recon.{_recon_to_official(match.group(2), down_blocks, resblocks)}"
    if key.startswith("rrs.bn."):
        return "rrs.bn_idx." + key[len("rrs.bn."):]
    match = re.match(r"discriminator\.(decoder\d\..+)$", key)
    if match:
        return "rrs." + match.group(1).replace(".layers.", "._layers.").replace(".block.", "._block.")
    return None


def _down_blocks(model) -> set[int]:
    unet = model.recon.unets[0]
    return {i for i, block in enumerate(unet.input_blocks)
            if i > 0 and len(block) == 1 and getattr(block[0], "down", False)}


def _resblock_paths(model) -> set[str]:
    from .recon import ResBlock

    return {name for name, module in model.recon.unets[0].named_modules() if isinstance(module, ResBlock)}


def _official_layer_names(model) -> list[str]:
    offset = 1 if "efficientnet" in model.backbone.name else 0
    return [f"layer{index + offset}" for index in model.layers]


def realnet_to_official_state_dict(model) -> dict[str, torch.Tensor]:
    """A `RealNet`'s weights in the official key layout (what `ckpt_best.pth.tar` would hold)."""
    layers, down, resblocks = _official_layer_names(model), _down_blocks(model), _resblock_paths(model)
    out = {}
    for key, value in model.state_dict().items():
        if _OURS_ONLY.match(key):
            continue
        official = realnet_to_official_key(key, layers, down, resblocks)
        if official is None:
            raise InputError(f"{key}: no counterpart in the official RealNet layout")
        out[official] = value.clone()
    return out


def _rename_official(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, unknown = {}, []
    for key, value in state.items():
        ours = official_to_realnet_key(key)
        if ours is None:
            unknown.append(key)
        else:
            out[ours] = value
    return out, sorted(unknown)


def official_to_realnet_state_dict(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename an official state dict to `RealNet` keys; unknown keys are an InputError listing them."""
    out, unknown = _rename_official(state)
    if unknown:
        raise InputError(f"{source}: not an official RealNet state dict: " + describe_key_mismatch([], sorted(unknown), []))
    return out


# ---------------------------------------------------------------------------------------------
# configuration


def _arch_entry(metadata: Mapping[str, Any], name: str) -> dict[str, Any]:
    arch = metadata.get("arch")
    if isinstance(arch, list):
        for entry in arch:
            if isinstance(entry, Mapping) and entry.get("name") == name:
                return dict(entry.get("kwargs") or {})
    return {}


def _infer_backbone(state: Mapping[str, torch.Tensor], source: str) -> str:
    prefix = "backbone.feature_extractor."
    if f"{prefix}conv_stem.weight" in state:
        return "efficientnet_b4"
    if f"{prefix}layer1.0.conv3.weight" in state:
        width = state[f"{prefix}layer1.0.conv1.weight"].shape[0]
        return {64: "resnet50", 128: "wide_resnet50_2"}.get(int(width)) or _unknown_backbone(source)
    if f"{prefix}layer1.0.conv1.weight" in state:
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}layer1\.(\d+)\.", k))}
        return {2: "resnet18", 3: "resnet34"}.get(len(blocks)) or _unknown_backbone(source)
    return _unknown_backbone(source)


def _unknown_backbone(source: str) -> str:
    raise InputError(f"{source}: cannot tell the backbone from the weights; pass `backbone`")


def _recon_shape(state: Mapping[str, torch.Tensor], block: str, channels: int, source: str) -> dict[str, Any]:
    """Width ratio, channel multipliers, res blocks per level and attention levels of one U-Net."""
    prefix = f"recon.{block}_recon."
    base = int(state[f"{prefix}input_blocks.0.weight"].shape[0])
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}input_blocks\.(\d+)\.", k))})
    downs = [i for i in indices if f"{prefix}input_blocks.{i}.in_layers.0.weight" in state]
    levels = len(downs) + 1
    per_level = (len(indices) - 1 - len(downs)) // levels
    if per_level < 1 or 1 + levels * per_level + len(downs) != len(indices):
        raise InputError(f"{source}: unexpected reconstruction U-Net layout in {prefix}input_blocks")
    mult, attention, ds = [], [], 1
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        width = int(state[f"{prefix}input_blocks.{first}.0.in_layers.2.weight"].shape[0])
        if width % base:
            raise InputError(f"{source}: reconstruction width {width} is not a multiple of the base width {base}")
        mult.append(width // base)
        if f"{prefix}input_blocks.{first}.1.qkv.weight" in state:
            attention.append(ds)
        ds *= 2
    return {"recon_width_ratio": base / channels, "recon_channel_mult": mult, "recon_num_res_blocks": per_level,
            "recon_attention_mult": attention}


def infer_realnet_config(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    backbone: str | None = None,
    image_size: int | list[int] = 256,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """`RealNet` keyword arguments reproducing an official checkpoint (architecture A)."""
    metadata = metadata or {}
    backbone = backbone or _arch_entry(metadata, "backbone").get("backbone") or _infer_backbone(state, source)
    blocks: dict[int, list[tuple[str, int]]] = {}
    for key, value in state.items():
        match = re.fullmatch(r"afs\.indexes\.(block\d+)_(\w+)", key)
        if match:
            blocks.setdefault(_block_number(match.group(1)), []).append((match.group(2), value.numel()))
    if not blocks:
        raise InputError(f"{source}: no AFS indices (afs.indexes.*) in the checkpoint")
    if any(len(layers) != 1 for layers in blocks.values()):
        raise InputError(f"{source}: blocks with several backbone layers (architecture B/C) are not supported; "
                         "only architecture A (one layer per block) is")
    order = sorted(blocks)
    if order != list(range(len(order))):
        raise InputError(f"{source}: AFS blocks are not numbered block1..block{len(order)}")
    offset = 1 if "efficientnet" in backbone else 0
    layers = []
    for i in order:
        name = blocks[i][0][0]
        match = re.fullmatch(r"layer(\d+)", name)
        if match is None:
            raise InputError(f"{source}: AFS layer name {name!r}: expected layer<N>")
        layers.append(int(match.group(1)) - offset)
    afs_channels = [blocks[i][0][1] for i in order]

    recon = _recon_shape(state, "block1", afs_channels[0], source)
    decoder_in = state.get("rrs.decoder1.1.weight")
    if decoder_in is None:
        raise InputError(f"{source}: no RRS decoder (rrs.decoder1.1.weight) in the checkpoint")
    rrs_kwargs = _arch_entry(metadata, "rrs")
    modes, numbers = rrs_kwargs.get("modes"), rrs_kwargs.get("mode_numbers")
    if modes and numbers:
        if sorted(modes) != ["max", "mean"] or len(numbers) != 2:
            raise InputError(f"{source}: RRS modes {modes} are not supported (expected one 'max' and one 'mean')")
        top_k = [int(numbers[modes.index("max")]), int(numbers[modes.index("mean")])]
    else:
        total = int(decoder_in.shape[1])
        if total % 2:
            raise InputError(f"{source}: cannot split {total} RRS channels into max/mean halves; the checkpoint's "
                             "arch entry is needed")
        top_k = [total // 2, total // 2]
    residual_layers = len({int(m.group(1)) for k in state if (m := re.match(r"rrs\.decoder1\.0\._layers\.(\d+)\.", k))})
    return dict(
        backbone=backbone, layers=layers, afs_channels=afs_channels, rrs_top_k=top_k, image_size=image_size,
        image_score="pool16", standardize_features=False, rrs_bn_momentum=0.9,
        discriminator_residual_layers=residual_layers, backbone_pretrained=False, recon_norm_groups="official", **recon,
    )


def convert_official_realnet(
    checkpoint: str | Path,
    output_dir: str | Path | None = None,
    *,
    backbone: str | None = None,
    image_size: int | list[int] | str = 256,
    overwrite: bool = False,
    card_facts: Mapping[str, Any] | None = None,
):
    """Load an official RealNet checkpoint into a `RealNet` (strict), optionally saving it.

    With `output_dir`, writes `config.json`, `model.safetensors` and a model card (`card_facts`:
    dataset, category, metrics, ... as for `realnet.cards.render_realnet_card`).
    """
    from .model import RealNet

    if output_dir is not None:
        output_dir = Path(output_dir)
        if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
            raise InputError(f"{output_dir}: output folder is not empty (pass `overwrite=True`)")
    from .image_size import check_stride, model_stride, parse_image_size

    trained = parse_image_size(image_size, "`image_size`")
    image_size = trained[0] if trained[0] == trained[1] else list(trained)  # square sizes keep their one-number config
    state, metadata = load_official_checkpoint(checkpoint)
    source = str(checkpoint)
    config = infer_realnet_config(state, metadata, backbone=backbone, image_size=image_size, source=source)
    model = RealNet(**config)
    check_stride(trained, model_stride(model), "`image_size`", f"the {config['backbone']} backbone")
    model.load_state_dict(_official_state(model, state, config, source), strict=True)
    model.eval()
    if output_dir is not None:
        _save_converted(model, output_dir, config, trained, Path(checkpoint).name, metadata, card_facts)
    return model


def _official_state(model, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: str) -> dict:
    """The model's full state dict with the checkpoint's tensors in place; every key must match in
    name and shape (mismatches are reported as the checkpoint spells them) and AFS indices must
    name backbone channels."""
    mapped, unknown = _rename_official(state)
    expected = model.state_dict()
    layers, down, resblocks = _official_layer_names(model), _down_blocks(model), _resblock_paths(model)

    def official_name(key: str) -> str:  # report keys as they are spelled in the checkpoint
        return realnet_to_official_key(key, layers, down, resblocks) or key

    missing = sorted(official_name(k) for k in set(expected) - set(mapped) if not _OURS_ONLY.match(k))
    unexpected = unknown + sorted(official_name(k) for k in set(mapped) - set(expected))
    shapes = sorted(f"{official_name(k)} {tuple(mapped[k].shape)} vs {tuple(expected[k].shape)}"
                    for k in set(mapped) & set(expected) if mapped[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise InputError(f"{source}: does not fit RealNet({config['backbone']}): "
                         + describe_key_mismatch(missing, unexpected, shapes))
    for i, size in enumerate(config["layers"]):
        indices = mapped[f"selector.indices_{i}"]
        channels = model.backbone.channels[i]
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= channels):
            raise InputError(f"{source}: AFS indices of block{i + 1} fall outside the {channels} backbone channels")
    full = dict(expected)
    full.update({k: v.to(expected[k].dtype) for k, v in mapped.items()})
    full["selector.ready"] = torch.tensor(True)
    return full


def _save_converted(model, output_dir: Path, config: Mapping[str, Any], trained: tuple[int, int], checkpoint_name: str,
                    metadata: Mapping[str, Any], card_facts: Mapping[str, Any] | None) -> None:
    """Write the converted model folder: config, weights and a card saying where the weights came from."""
    from .cards import write_realnet_card
    from .image_size import format_image_size

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    facts = {
        "backbone": config["backbone"], "image_size": format_image_size(trained),
        "source": f"converted from the official RealNet checkpoint {checkpoint_name}"
                  + (f" (epoch {metadata['epoch']})" if "epoch" in metadata else ""),
    }
    if isinstance(metadata.get("best_metric"), (int, float)):
        facts["training"] = {"official best_metric (mean of image and pixel AUROC on the test set)":
                             float(metadata["best_metric"])}
    facts.update(card_facts or {})
    write_realnet_card(output_dir, **facts)
