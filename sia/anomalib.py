"""sia's anomalies inside anomalib: a drop-in for anomalib's ``PerlinAnomalyGenerator``.

anomalib's DRAEM, DSR and GLASS synthesise their training anomalies with
``PerlinAnomalyGenerator`` and offer no hook for another generator. :class:`SiaAnomalyGenerator`
has exactly that generator's call contract (``augmented, mask = generator(images)``), backed by
:class:`sia.AnomalySynthesizer`: foreground-aware Perlin masks, SIA / DTD / CutPaste sources and a
seeded random sequence. :func:`use_sia` swaps it into any anomalib model in one call::

    from anomalib.models import Draem
    from sia.anomalib import use_sia

    model = use_sia(Draem(dtd_dir="dtd/images"), source="dtd:dtd/images", category="hazelnut", seed=0)

The generator itself needs only torchvision; :func:`use_sia` needs anomalib (``sia[anomalib]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

from .errors import InputError, MissingExtraError
from .foreground import ForegroundConfig
from .sources import AnomalySource
from .synthesizer import FLOAT_RANGE_TOLERANCE, AnomalySynthesizer

ANOMALIB_EXTRA = 'pip install "sia[anomalib]"'


def import_anomalib_generators():
    """anomalib's generators module, or a one-line MissingExtraError naming the extra to install."""
    try:
        from anomalib.data.utils import generators
    except ImportError as err:
        raise missing_anomalib(err) from None
    return generators


def missing_anomalib(err: ImportError) -> MissingExtraError:
    """The error for an environment without anomalib (or one of its dependencies)."""
    return MissingExtraError(f"anomalib is not installed (no module {err.name or err}); install it with {ANOMALIB_EXTRA}")


def _generator_from(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator: the one given, one seeded with ``seed``, or one seeded from torch's global RNG.

    Drawing the seed from the global RNG keeps ``lightning.seed_everything`` / ``torch.manual_seed``
    runs reproducible when no seed is given.
    """
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise InputError(f"seed: expected a CPU torch.Generator, got one on {seed.device}")
        return seed
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed: expected an int, a torch.Generator or None, got {seed!r}")
    return torch.Generator().manual_seed(int(seed))


class SiaAnomalyGenerator(v2.Transform):
    """``augmented, mask = generator(images)`` with sia's anomalies; anomalib's generator contract.

    ``images``: float (3, H, W) or (B, 3, H, W) in [0, 1] on any device. Returns the augmented
    images (same shape, dtype and device) and masks (1, H, W) / (B, 1, H, W) in {0, 1} of the same
    dtype. Each image becomes anomalous with probability ``probability``; the others come back
    unchanged with an empty mask.

    Args:
        source: an anomaly source spec (``"dtd:DIR"``, ``"sia:DIR_OR_HUB_ID"``, ``"cutpaste"``), an
            :class:`~sia.sources.AnomalySource`, or a ready :class:`~sia.AnomalySynthesizer`
            (then ``category``, ``opacity`` and ``require_nonempty`` must stay at their defaults).
        category: foreground preset (``"bottle"``, ``"visa/pcb1"``, ``"hazelnut-toy"``, ``"auto"``),
            ``"none"`` (whole image) or a :class:`~sia.ForegroundConfig`.
        probability: chance that an image becomes anomalous (anomalib's default: 0.5).
        opacity: blend opacity range; default: the source's own (DTD [0.2, 1], SIA and CutPaste [0.5, 1]).
        require_nonempty: redraw empty masks, as anomalib's generator does (up to 10 times there).
        seed: an int or a CPU ``torch.Generator``: the same seed gives the same sequence of
            anomalies call after call. ``None`` seeds from torch's global RNG.
    """

    def __init__(
        self,
        source: str | AnomalySource | AnomalySynthesizer | Any = "cutpaste",
        category: str | ForegroundConfig | None = "none",
        probability: float = 0.5,
        opacity: float | Sequence[float] | None = None,
        require_nonempty: bool = True,
        seed: int | torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0.0 <= probability <= 1.0:
            raise InputError(f"probability: expected a number in [0, 1], got {probability!r}")
        if isinstance(source, AnomalySynthesizer):
            if category not in (None, "none") or opacity is not None or require_nonempty is not True:
                raise InputError("source: a ready AnomalySynthesizer already fixes category, opacity and require_nonempty")
            self.synthesizer = source
        else:
            self.synthesizer = AnomalySynthesizer(source, category=category, opacity=opacity, require_nonempty=require_nonempty)
        self.probability = float(probability)
        self.generator = _generator_from(seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.synthesizer!r}, probability={self.probability})"

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # anomalib's argument name
        """Synthesise anomalies on one image (C, H, W) or a batch (B, C, H, W) in [0, 1]."""
        batch = _check_images(img)
        out, masks = self.synthesizer.synthesize_batch(batch, self.generator, probability=self.probability)
        out = out.to(device=img.device, dtype=img.dtype)
        masks = masks.to(device=img.device, dtype=img.dtype)
        return (out, masks) if img.ndim == 4 else (out[0], masks[0])


def _check_images(img: Any) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) finite floats in [0, 1] -> a float32 CPU batch, else a one-line InputError."""
    if not isinstance(img, torch.Tensor):
        raise InputError(f"img: expected a float tensor (C, H, W) or (B, C, H, W) in [0, 1], got {type(img).__name__}")
    shape = tuple(img.shape)
    if img.ndim not in (3, 4) or img.shape[-3] != 3 or img.shape[-1] == 0 or img.shape[-2] == 0:
        raise InputError(f"img: expected a float tensor (3, H, W) or (B, 3, H, W) in [0, 1], got shape {shape}")
    if not img.is_floating_point():
        raise InputError(f"img: expected float values in [0, 1], got dtype {img.dtype} with shape {shape}")
    batch = img.detach().float().cpu()
    if batch.ndim == 3:
        batch = batch[None]
    if batch.numel():
        if not torch.isfinite(batch).all():
            raise InputError(f"img: expected float values in [0, 1], got NaN or infinite values in shape {shape}")
        low, high = float(batch.min()), float(batch.max())
        if low < -FLOAT_RANGE_TOLERANCE or high > 1.0 + FLOAT_RANGE_TOLERANCE:
            raise InputError(
                f"img: expected float values in [0, 1], got values in [{low:.4g}, {high:.4g}] with shape {shape} "
                "(normalised images? undo the normalisation first)"
            )
    return batch.clamp_(0.0, 1.0)


def _replaceable(module: nn.Module, generators) -> bool:
    return isinstance(module, (generators.PerlinAnomalyGenerator, SiaAnomalyGenerator))


def use_sia(
    model: nn.Module,
    source: str | AnomalySource | AnomalySynthesizer | Any = "cutpaste",
    category: str | ForegroundConfig | None = "none",
    *,
    probability: float | None = None,
    opacity: float | Sequence[float] | None = None,
    require_nonempty: bool = True,
    seed: int | torch.Generator | None = None,
) -> nn.Module:
    """Replace every anomaly generator of an anomalib model with a :class:`SiaAnomalyGenerator`.

    Works for any model that synthesises anomalies with anomalib's ``PerlinAnomalyGenerator``,
    wherever it sits (``Draem.augmenter``, ``Dsr.perlin_generator``, ``Glass.model.augmentor``).
    Each replacement keeps the replaced generator's ``probability`` unless one is given (GLASS
    uses 1.0, DRAEM and DSR 0.5). Returns the same model, changed in place.
    """
    generators = import_anomalib_generators()
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected an anomalib model (a torch.nn.Module), got {type(model).__name__}")
    found = [(name, module) for name, module in model.named_modules() if name and _replaceable(module, generators)]
    if not found:
        raise InputError(
            f"model: {type(model).__name__} has no anomaly generator (PerlinAnomalyGenerator) to replace; "
            "use_sia works with models that synthesise anomalies during training, e.g. Draem, Dsr, Glass"
        )
    rng = _generator_from(seed)
    for name, module in found:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replacement = SiaAnomalyGenerator(
            source,
            category=category,
            probability=module.probability if probability is None else probability,
            opacity=opacity,
            require_nonempty=require_nonempty,
            seed=rng if len(found) == 1 else int(torch.randint(0, 2**62, (1,), generator=rng)),
        )
        setattr(parent, attribute, replacement)
    return model


__all__ = ["ANOMALIB_EXTRA", "SiaAnomalyGenerator", "use_sia"]
