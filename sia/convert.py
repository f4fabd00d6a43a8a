"""Convert the official SDAS diffusion checkpoints (guided-diffusion ADM layout) to diffusers.

The official RealNet repository releases one class-conditional ADM UNet per dataset (learned sigma,
scale-shift norm, residual up/down blocks, legacy QKV attention), e.g. the MVTec-AD epoch-240 EMA
weights. `convert_official_sdas` maps such a checkpoint key for key onto a diffusers `UNet2DModel`
and saves an `SDASPipeline` whose categories follow the official class-id order
(`sia.categories.DATASET_CATEGORIES`).

Checkpoints are only ever read with `torch.load(weights_only=True)`. Released checkpoints are dicts
`{epoch, arch, state_dict, ...}` whose `arch` is an `easydict.EasyDict`; that single class is
allowed through torch's safe-globals mechanism with a plain-dict stand-in, so neither `easydict`
nor full unpickling is needed.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .categories import DATASET_CATEGORIES, resolve_dataset
from .errors import InputError
from .outputs import check_replaceable, files_under, partial_folder, swap_in
from .paths import separate_output, writable_folder_path

__all__ = [
    "load_official_checkpoint",
    "strip_prefix",
    "adm_unet_config",
    "adm_settings_from_metadata",
    "adm_to_diffusers_state_dict",
    "convert_adm_unet",
    "convert_official_sdas",
    "describe_key_mismatch",
    "convert_official_sia",
]


class _EasyDictStandIn:
    """Stands in for `easydict.EasyDict` while unpickling: creating one yields an `OrderedDict`.

    torch's weights-only unpickler fills items only into exact dict/OrderedDict objects and then
    restores the pickled attribute state into the new object's `__dict__`; an `OrderedDict`
    accepts both, and `_plain` turns it into a plain dict afterwards. Nothing of `easydict` runs.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return OrderedDict()


#: Marks a folder written by `convert_official_sia` (its generation.json), so --overwrite knows its own output.
OFFICIAL_SIA_GENERATOR = "official RealNet SDAS release (cnulab/RealNet)"
GENERATION_FILE = "generation.json"

_SAFE_GLOBALS = [(_EasyDictStandIn, "easydict.EasyDict")]


def _plain(obj: Any) -> Any:
    """Turn stand-in EasyDicts (and containers of them) into plain dicts and lists."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        return {key: _plain(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_plain(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(value) for value in obj)
    return obj


def load_official_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an official checkpoint safely and return `(state_dict, metadata)`.

    Accepts a bare state dict or a dict with a `state_dict` (or `model`) entry plus metadata such
    as `epoch` and `arch`. A DDP `module.` prefix is stripped. Only tensors and plain containers
    are unpickled (`weights_only=True`, with `easydict.EasyDict` mapped to a plain dict).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises several types; report one line
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: not a readable weights-only PyTorch checkpoint ({first_line})") from None
    obj = _plain(obj)
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors or a dict with 'state_dict', got {type(obj).__name__}")
    metadata: dict[str, Any] = {}
    state = obj
    for key in ("state_dict", "model", "ema"):
        if isinstance(obj.get(key), dict):
            state = obj[key]
            metadata = {k: v for k, v in obj.items() if k != key}
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"{path}: the checkpoint holds no tensors (keys: {', '.join(map(str, list(obj)[:8]))})")
    non_tensors = sorted(set(state) - set(tensors))
    if non_tensors:
        raise InputError(f"{path}: state dict entries that are not tensors: {', '.join(map(str, non_tensors[:8]))}")
    return strip_prefix(tensors, "module."), metadata


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove `prefix` from every key when all keys carry it (DDP checkpoints)."""
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def describe_key_mismatch(missing: list[str], unexpected: list[str], shapes: list[str], limit: int = 12) -> str:
    """One line listing missing keys, unexpected keys and shape mismatches."""
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
            parts.append(f"{label} keys ({len(keys)}): {shown}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# ADM layout analysis


def _block_indices(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})


def _is_resblock(state: Mapping[str, torch.Tensor], prefix: str) -> bool:
    return f"{prefix}.in_layers.2.weight" in state


def _is_attention(state: Mapping[str, torch.Tensor], prefix: str) -> bool:
    return f"{prefix}.qkv.weight" in state


# The released SDAS models and OpenAI's 256x256 ADM share one layout; for it the settings the weights
# do not store are known: 256 px images and 64-channel attention heads.
_OFFICIAL_LAYOUT = {"widths": (256, 256, 512, 512, 1024, 1024), "layers": 2,
                    "attention": (False, False, False, True, True, True)}
_OFFICIAL_SETTINGS = {"sample_size": 256, "num_head_channels": 64}


def _positive_int(value: Any) -> int | None:
    try:
        number = int(value[0] if isinstance(value, (list, tuple)) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if number > 0 else None


def adm_settings_from_metadata(metadata: Mapping[str, Any] | None) -> dict[str, int]:
    """Image size and attention heads recorded in an official checkpoint's `arch` (its training config).

    The official config keeps them under `unet` (`num_head_channels`, -1 = use `num_heads`;
    `image_size`) and the image size also under `dataset` (`input_size`, `H`). Absent values are left out.
    """
    arch = (metadata or {}).get("arch")
    if not isinstance(arch, Mapping):
        return {}
    unet = arch.get("unet") if isinstance(arch.get("unet"), Mapping) else {}
    dataset = arch.get("dataset") if isinstance(arch.get("dataset"), Mapping) else {}
    found: dict[str, int] = {}
    head_channels, heads = _positive_int(unet.get("num_head_channels")), _positive_int(unet.get("num_heads"))
    if head_channels:
        found["num_head_channels"] = head_channels
    elif heads:
        found["num_heads"] = heads
    for value in (unet.get("image_size"), dataset.get("input_size"), dataset.get("H")):
        if _positive_int(value):
            found["sample_size"] = _positive_int(value)
            break
    return found


def _adm_levels(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[int, list[int], list[bool]]:
    """(residual blocks per level, width of each level, whether each level has attention), read from
    the ADM block layout; only ``resblock_updown=True`` models (resnets that up/downsample) map."""
    inputs = _block_indices(state_dict, "input_blocks")
    outputs = _block_indices(state_dict, "output_blocks")
    up_blocks = [i for i in outputs
                 if any(_is_resblock(state_dict, f"output_blocks.{i}.{j}") for j in (1, 2))]
    levels = len(up_blocks) + 1
    if len(outputs) % levels or len(inputs) != len(outputs):
        raise InputError(f"{source}: unexpected ADM block layout ({len(inputs)} input blocks, "
                         f"{len(outputs)} output blocks, {levels} levels)")
    layers = len(outputs) // levels - 1
    if layers < 1:
        raise InputError(f"{source}: unexpected ADM block layout (no residual blocks per level)")

    widths, attention = [], []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        prefix = f"input_blocks.{first}"
        if not _is_resblock(state_dict, f"{prefix}.0"):
            raise InputError(f"{source}: {prefix} is not a residual block; only ADM models with "
                             "resblock_updown=True are supported")
        widths.append(int(state_dict[f"{prefix}.0.out_layers.3.weight"].shape[0]))
        attention.append(_is_attention(state_dict, f"{prefix}.1"))
        if level < levels - 1 and not _is_resblock(state_dict, f"input_blocks.{first + layers}.0"):
            raise InputError(f"{source}: input_blocks.{first + layers} is not a residual downsampling block; "
                             "only ADM models with resblock_updown=True are supported")
    return layers, widths, attention


def _head_width(widths: list[int], attention: list[bool], num_head_channels: int | None, num_heads: int | None,
                source: str) -> int:
    """The attention head width `UNet2DModel` needs: ``num_head_channels``, or the one width every
    attention layer (and the middle block) shares divided by ``num_heads``."""
    attention_widths = {w for w, a in zip(widths, attention) if a} | {widths[-1]}
    if num_head_channels is None:
        if len(attention_widths) != 1:
            raise InputError(f"{source}: num_heads maps onto UNet2DModel only when every attention layer has the same "
                             f"width (widths {sorted(attention_widths)}); pass `num_head_channels`")
        head_dim = next(iter(attention_widths)) // num_heads
    else:
        head_dim = num_head_channels
    bad = sorted(w for w in attention_widths if w % head_dim)
    if bad:
        raise InputError(f"{source}: attention widths {bad} are not divisible by head width {head_dim}")
    return head_dim


def adm_unet_config(
    state_dict: Mapping[str, torch.Tensor],
    sample_size: int | None = None,
    num_head_channels: int | None = None,
    num_heads: int | None = None,
    norm_num_groups: int = 32,
    source: str = "checkpoint",
    metadata: Mapping[str, Any] | None = None,
    fallback_head_channels: int | None = None,
) -> dict[str, Any]:
    """Infer the `UNet2DModel` config of an ADM state dict from its key layout and tensor shapes.

    The shapes determine the widths, levels, residual blocks, attention levels, time-embedding style,
    in/out channels and classes. They cannot determine the image size (the UNet is fully
    convolutional) nor the attention heads (legacy qkv weights have the same shape for any head
    count); these come from the arguments, else from the checkpoint's `arch` metadata, else from the
    released official layout when the weights have it, else an InputError names the argument
    (`fallback_head_channels`, when given, is used instead of refusing the head width: for
    initialising another model from the weights, where any grouping of the qkv rows is acceptable).
    GroupNorm uses 32 groups, a constant of the ADM code.
    """
    required = ["input_blocks.0.0.weight", "out.2.weight", "time_embed.0.weight", "time_embed.2.weight"]
    absent = [key for key in required if key not in state_dict]
    if absent:
        raise InputError(f"{source}: not a guided-diffusion ADM UNet state dict (missing {', '.join(absent)})")
    model_channels, in_channels = state_dict["input_blocks.0.0.weight"].shape[:2]
    out_channels = state_dict["out.2.weight"].shape[0]
    if state_dict["time_embed.0.weight"].shape[1] != model_channels:
        raise InputError(f"{source}: the time embedding width differs from the first level width; "
                         "only channel_mult[0] == 1 maps onto UNet2DModel")

    layers, widths, attention = _adm_levels(state_dict, source)
    emb_out = state_dict["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    scale_shift = emb_out == 2 * widths[0]
    for width in set(widths):
        if width % norm_num_groups:
            raise InputError(f"{source}: width {width} is not divisible by {norm_num_groups} GroupNorm groups")
    known: dict[str, int] = {}
    if (tuple(widths), layers, tuple(attention)) == tuple(_OFFICIAL_LAYOUT.values()):
        known.update(_OFFICIAL_SETTINGS)
    known.update(adm_settings_from_metadata(metadata))
    if num_head_channels is None and num_heads is None:
        num_head_channels, num_heads = known.get("num_head_channels"), known.get("num_heads")
    if num_head_channels is None and num_heads is None:
        num_head_channels = fallback_head_channels
    if num_head_channels is None and num_heads is None:
        raise InputError(f"{source}: the attention head width is not stored in ADM weights (its qkv shape is the same "
                         "for any head count) and the checkpoint has no arch entry for it; pass "
                         "`num_head_channels` or `num_heads`")
    if sample_size is None:
        sample_size = known.get("sample_size")
    if sample_size is None:
        raise InputError(f"{source}: the image size is not stored in ADM weights (the UNet is fully convolutional) and "
                         "the checkpoint has no arch entry for it; pass `sample_size`")
    head_dim = _head_width(widths, attention, num_head_channels, num_heads, source)

    down = tuple("AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attention))
    config: dict[str, Any] = dict(
        sample_size=sample_size, in_channels=int(in_channels), out_channels=int(out_channels),
        layers_per_block=layers, block_out_channels=tuple(widths), down_block_types=down,
        up_block_types=up, attention_head_dim=head_dim,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        downsample_type="resnet", upsample_type="resnet", norm_num_groups=norm_num_groups,
        attn_norm_num_groups=norm_num_groups, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    )
    if "label_emb.weight" in state_dict:
        config["num_class_embeds"] = int(state_dict["label_emb.weight"].shape[0])
    return config


def _legacy_qkv_to_qkv(tensor: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a legacy `[head][q|k|v][head_dim]` qkv projection into q, k and v.

    guided-diffusion's QKVAttentionLegacy reshapes the 3C outputs per head first, so the rows of
    its 1x1 conv are ordered head by head; diffusers expects all q rows, then k, then v.
    """
    channels = tensor.shape[0] // 3
    head_dim = channels // heads
    rest = tensor.shape[1:]
    reordered = tensor.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(3, channels, *rest)
    return reordered[0], reordered[1], reordered[2]


def adm_to_diffusers_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename (and reorder) ADM weights into `UNet2DModel` keys for `config`.

    Every source key must be used exactly once; leftovers are reported as unexpected keys.
    """
    keys = _KeyMapper(state_dict, int(config["attention_head_dim"]))
    take, resnet, attention = keys.take, keys.resnet, keys.attention
    take("input_blocks.0.0.weight", "conv_in.weight")
    take("input_blocks.0.0.bias", "conv_in.bias")
    take("time_embed.0.weight", "time_embedding.linear_1.weight")
    take("time_embed.0.bias", "time_embedding.linear_1.bias")
    take("time_embed.2.weight", "time_embedding.linear_2.weight")
    take("time_embed.2.bias", "time_embedding.linear_2.bias")
    if config.get("num_class_embeds"):
        take("label_emb.weight", "class_embedding.weight")

    layers = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    has_attention = ["Attn" in name for name in config["down_block_types"]]
    for level in range(levels):
        for j in range(layers):
            src = f"input_blocks.{1 + level * (layers + 1) + j}"
            resnet(f"{src}.0", f"down_blocks.{level}.resnets.{j}")
            if has_attention[level]:
                attention(f"{src}.1", f"down_blocks.{level}.attentions.{j}")
        if level < levels - 1:
            resnet(f"input_blocks.{1 + level * (layers + 1) + layers}.0", f"down_blocks.{level}.downsamplers.0")

    resnet("middle_block.0", "mid_block.resnets.0")
    attention("middle_block.1", "mid_block.attentions.0")
    resnet("middle_block.2", "mid_block.resnets.1")

    for up in range(levels):
        attn = has_attention[levels - 1 - up]
        for j in range(layers + 1):
            src = f"output_blocks.{up * (layers + 1) + j}"
            resnet(f"{src}.0", f"up_blocks.{up}.resnets.{j}")
            if attn:
                attention(f"{src}.1", f"up_blocks.{up}.attentions.{j}")
        if up < levels - 1:
            src = f"output_blocks.{up * (layers + 1) + layers}.{2 if attn else 1}"
            resnet(src, f"up_blocks.{up}.upsamplers.0")

    take("out.0.weight", "conv_norm_out.weight")
    take("out.0.bias", "conv_norm_out.bias")
    take("out.2.weight", "conv_out.weight")
    take("out.2.bias", "conv_out.bias")

    unexpected = sorted(set(state_dict) - keys.used)
    if keys.missing or unexpected:
        raise InputError(f"{source}: does not match the ADM layout: "
                         + describe_key_mismatch(keys.missing, unexpected, []))
    return keys.out


class _KeyMapper:
    """Moves ADM tensors to their `UNet2DModel` keys, noting which source keys were used and which were missing."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], attention_head_dim: int) -> None:
        self.state_dict, self.attention_head_dim = state_dict, attention_head_dim
        self.out: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()
        self.missing: list[str] = []

    def take(self, src: str, dst: str, transform=None) -> None:
        if src not in self.state_dict:
            self.missing.append(src)
            return
        tensor = self.state_dict[src]
        self.out[dst] = transform(tensor) if transform else tensor
        self.used.add(src)

    def take_optional(self, src: str, dst: str) -> None:
        if src in self.state_dict:
            self.take(src, dst)

    def resnet(self, src: str, dst: str) -> None:
        for a, b in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                     ("out_layers.0", "norm2"), ("out_layers.3", "conv2")):
            self.take(f"{src}.{a}.weight", f"{dst}.{b}.weight")
            self.take(f"{src}.{a}.bias", f"{dst}.{b}.bias")
        self.take_optional(f"{src}.skip_connection.weight", f"{dst}.conv_shortcut.weight")
        self.take_optional(f"{src}.skip_connection.bias", f"{dst}.conv_shortcut.bias")

    def attention(self, src: str, dst: str) -> None:
        self.take(f"{src}.norm.weight", f"{dst}.group_norm.weight")
        self.take(f"{src}.norm.bias", f"{dst}.group_norm.bias")
        for kind in ("weight", "bias"):
            key = f"{src}.qkv.{kind}"
            if key not in self.state_dict:
                self.missing.append(key)
                continue
            tensor = self.state_dict[key]
            if kind == "weight":
                tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
            heads = (tensor.shape[0] // 3) // self.attention_head_dim
            q, k, v = _legacy_qkv_to_qkv(tensor, heads)
            self.out[f"{dst}.to_q.{kind}"], self.out[f"{dst}.to_k.{kind}"], self.out[f"{dst}.to_v.{kind}"] = q, k, v
            self.used.add(key)
        self.take(f"{src}.proj_out.weight", f"{dst}.to_out.0.weight", lambda w: w.reshape(w.shape[0], w.shape[1]))
        self.take(f"{src}.proj_out.bias", f"{dst}.to_out.0.bias")


def convert_adm_unet(
    state_dict: Mapping[str, torch.Tensor],
    sample_size: int | None = None,
    num_head_channels: int | None = None,
    num_heads: int | None = None,
    norm_num_groups: int = 32,
    source: str = "checkpoint",
    metadata: Mapping[str, Any] | None = None,
):
    """Build a `UNet2DModel` holding the weights of an ADM state dict (strict: every key used).

    Settings the weights do not store are resolved as in `adm_unet_config`."""
    from diffusers import UNet2DModel

    config = adm_unet_config(state_dict, sample_size, num_head_channels, num_heads, norm_num_groups, source, metadata)
    converted = adm_to_diffusers_state_dict(state_dict, config, source)
    unet = UNet2DModel(**config)
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shapes = sorted(f"{k} {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}"
                    for k in set(expected) & set(converted) if converted[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise InputError(f"{source}: cannot load into UNet2DModel: " + describe_key_mismatch(missing, unexpected, shapes))
    unet.load_state_dict({k: v.to(expected[k].dtype) for k, v in converted.items()}, strict=True)
    return unet.eval()


def convert_official_sdas(
    checkpoint: str | Path,
    output_dir: str | Path,
    dataset: str = "mvtec-ad",
    categories: list[str] | None = None,
    sample_size: int | None = None,
    num_head_channels: int | None = None,
    overwrite: bool = False,
    card_facts: Mapping[str, Any] | None = None,
    num_heads: int | None = None,
) -> Path:
    """Convert an official SDAS diffusion checkpoint into an `SDASPipeline` folder.

    `categories` defaults to the official class-id order of `dataset`; their number must equal
    the checkpoint's class embeddings. The pipeline uses the default `SDASScheduler` (T=1000,
    linear betas, learned-range variance), the schedule the official model was trained with.
    `sample_size` and the attention heads (`num_head_channels` or `num_heads`) are not stored in
    the weights: when not given they come from the checkpoint's `arch` or the released layout,
    else the conversion is refused (see `adm_unet_config`).
    """
    output_dir = writable_folder_path(output_dir, "`output_dir`")
    separate_output(output_dir, [checkpoint], "`output_dir`")
    check_replaceable(output_dir, overwrite, _pipeline_files(output_dir), "`output_dir`", "sia convert-official")
    state, metadata = load_official_checkpoint(checkpoint)
    unet = convert_adm_unet(state, sample_size=sample_size, num_head_channels=num_head_channels, num_heads=num_heads,
                            source=str(checkpoint), metadata=metadata)
    if categories is None:
        dataset = resolve_dataset(dataset)
        categories = list(DATASET_CATEGORIES[dataset])
    classes = unet.config.num_class_embeds
    if classes is None:
        raise InputError(f"{checkpoint}: the UNet is not class-conditional (no label_emb); SDAS needs one class per category")
    if len(categories) != classes:
        raise InputError(f"{checkpoint}: the checkpoint has {classes} classes but {len(categories)} categories were given "
                         f"({', '.join(categories)})")

    from .cards import write_model_card
    from .pipeline import SDASPipeline
    from .scheduler import SDASScheduler

    pipe = SDASPipeline(unet=unet, scheduler=SDASScheduler(), categories=list(categories))
    facts = {
        "dataset": dataset, "categories": list(categories), "image_size": unet.config.sample_size,
        "source": f"converted from the official RealNet checkpoint {Path(checkpoint).name}"
                  + (f" (epoch {metadata['epoch']})" if "epoch" in metadata else ""),
    }
    facts.update(card_facts or {})
    partial = partial_folder(output_dir)
    try:
        pipe.save_pretrained(partial)
        write_model_card(partial, "sdas", **facts)
        swap_in(partial, output_dir)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return output_dir


def _pipeline_files(folder: Path) -> list[Path]:
    """Files of an SDASPipeline saved in `folder` (its model_index.json, card and component folders)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(index, dict) or index.get("_class_name") != "SDASPipeline":
        return []
    components = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
                  and (folder / name).is_dir() and name == Path(name).name]
    return [Path("model_index.json"), Path("README.md")] + [
        Path(name) / file for name in components for file in files_under(folder / name)]


def convert_official_sia(
    source: str | Path,
    output_dir: str | Path,
    dataset: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Turn an official SIA release folder (`<DS>/sdas/<class>/*.jpg`) into an SIA set folder.

    The output has the layout `sia generate` writes (`<category>/<file>` + `metadata.jsonl`), so
    `load_sia`, `sia push` and the `sia:` anomaly source read it. Images are copied byte for byte.
    The official sampler recorded neither the strength (drawn per batch of 16 from U(0.1, 0.2))
    nor a seed, so both are null.
    """
    from .hub import write_sia_metadata
    from .images import IMAGE_EXTENSIONS

    source = Path(source)
    if not source.is_dir():
        raise InputError(f"{source}: official SIA folder does not exist")
    output_dir = writable_folder_path(output_dir, "`output_dir`")
    separate_output(output_dir, [source], "`output_dir`")
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if dataset is not None:
        dataset = resolve_dataset(dataset)
        unknown = [p.name for p in folders if p.name not in DATASET_CATEGORIES[dataset]]
        if unknown:
            raise InputError(f"{source}: folders {', '.join(unknown)} are not {dataset} categories")
    check_replaceable(output_dir, overwrite, _converted_sia_files(output_dir), "`output_dir`", "sia convert-official")
    found = [(folder, sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
             for folder in folders]
    found = [(folder, files) for folder, files in found if files]
    if not found:
        raise InputError(f"{source}: no images found (expected <category>/*.jpg as in the official release)")
    partial = partial_folder(output_dir)
    try:
        rows = []
        for folder, files in found:
            (partial / folder.name).mkdir()
            for path in files:
                shutil.copyfile(path, partial / folder.name / path.name)
                rows.append({"file_name": f"{folder.name}/{path.name}", "category": folder.name,
                             "strength": None, "seed": None})
        write_sia_metadata(partial, rows)
        (partial / GENERATION_FILE).write_text(json.dumps({
            "generator": OFFICIAL_SIA_GENERATOR, "sampler": "IDDPM, 20 respaced steps",
            "strength": "U(0.1, 0.2) per batch of 16, not recorded per image", "format": "JPEG (quality 75)",
            **({"dataset": dataset} if dataset else {}),
        }, indent=2), encoding="utf-8")
        swap_in(partial, output_dir)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return output_dir


def _converted_sia_files(folder: Path) -> list[Path]:
    """Files an earlier `convert_official_sia` wrote into `folder`, from its generation.json and metadata."""
    try:
        generation = json.loads((folder / GENERATION_FILE).read_text(encoding="utf-8"))
        lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(generation, dict) or generation.get("generator") != OFFICIAL_SIA_GENERATOR:
        return []
    owned = [Path(GENERATION_FILE), Path("metadata.jsonl")]
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("file_name"), str):
            owned.append(Path(row["file_name"]))
    return owned
