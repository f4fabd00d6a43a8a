"""Batched Perlin-noise masks: the shape prior of the synthetic anomalies (DRAEM's generator).

The official RealNet code draws, for every sample, a single-octave Perlin noise with per-axis
lattice resolutions ``2**k`` (``k`` uniform in ``{0..5}``), rotates it by a uniform angle in
[-90, 90] degrees (bilinear, zero fill) and thresholds it at 0.5. This module does the same for a
whole batch at once, with mixed resolutions inside the batch, for any ``H x W``.

Thin defects such as cracks are not blob-shaped, so :func:`crack_masks_bool` draws thin bands
around the zero level set of a Perlin noise instead; ``mask_shape`` picks blobs (the official
default), cracks, or a mix.

Why a matrix product: inside one lattice cell the noise is a sum of products of a row-only factor,
a gradient of the lattice and a column-only factor. Writing the row factors as a sparse ``(H, L)``
matrix and the column factors as a ``(L, W)`` matrix turns the whole noise field into two small
batched matrix products, instead of eight full-resolution gathers. The result equals the
element-wise definition (see ``perlin_noise_reference`` and the tests).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .errors import InputError


def _fade(t: torch.Tensor) -> torch.Tensor:
    """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


@functools.lru_cache(maxsize=512)
def _axis_matrices(size: int, res: int, lattice: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Interpolation matrices of one axis, shape (size, lattice) each (cached: few distinct inputs).

    ``plain[i, c]`` holds the fade weight of lattice line ``c`` for pixel ``i`` (``1 - f`` on the
    lower line, ``f`` on the upper one); ``ramp`` holds the same weights multiplied by the signed
    distance to that line (``t`` and ``t - 1``), i.e. the factor that meets the gradient component
    along this axis.
    """
    position = torch.arange(size, dtype=torch.float64) * (res / size)
    cell = position.floor()
    frac = (position - cell).float()
    lower = cell.long()[:, None]
    fade = _fade(frac)
    plain = torch.zeros(size, lattice)
    ramp = torch.zeros(size, lattice)
    plain.scatter_(1, lower, (1.0 - fade)[:, None])
    plain.scatter_(1, lower + 1, fade[:, None])
    ramp.scatter_(1, lower, ((1.0 - fade) * frac)[:, None])
    ramp.scatter_(1, lower + 1, (fade * (frac - 1.0))[:, None])
    return plain, ramp


def _axis_weights(size: int, res: torch.Tensor, lattice: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample interpolation matrices of one axis, shape (B, size, lattice) each."""
    pairs = [_axis_matrices(size, int(r), lattice) for r in res.tolist()]
    return torch.stack([p for p, _ in pairs]), torch.stack([r for _, r in pairs])


def perlin_noise(
    batch: int,
    height: int,
    width: int,
    res_y: torch.Tensor,
    res_x: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Single-octave Perlin noise, shape (B, H, W), values in about (-1, 1).

    ``res_y[b]`` / ``res_x[b]`` are the lattice resolutions along rows / columns of sample ``b``
    (any positive integers). Gradient angles are uniform in [0, 2pi) and drawn from ``generator``.
    """
    res_y = torch.as_tensor(res_y, dtype=torch.long).reshape(batch)
    res_x = torch.as_tensor(res_x, dtype=torch.long).reshape(batch)
    lat_y = int(res_y.max()) + 1
    lat_x = int(res_x.max()) + 1
    angles = torch.rand(batch, lat_y, lat_x, generator=generator) * (2.0 * math.pi)
    grad_y, grad_x = torch.cos(angles), torch.sin(angles)
    row_plain, row_ramp = _axis_weights(height, res_y, lat_y)  # (B, H, Ly)
    col_plain, col_ramp = _axis_weights(width, res_x, lat_x)  # (B, W, Lx)
    # noise = R_ramp @ Gy @ C_plain^T + R_plain @ Gx @ C_ramp^T, done as one product per side.
    rows = torch.cat([row_ramp, row_plain], dim=2)  # (B, H, 2Ly)
    middle = torch.cat(
        [torch.bmm(grad_y, col_plain.transpose(1, 2)), torch.bmm(grad_x, col_ramp.transpose(1, 2))], dim=1
    )  # (B, 2Ly, W)
    return torch.bmm(rows, middle).mul_(math.sqrt(2.0))


def perlin_noise_reference(height: int, width: int, res_y: int, res_x: int, angles: torch.Tensor) -> torch.Tensor:
    """Element-wise Perlin noise (the textbook formula), for testing the batched version.

    ``angles`` is a (res_y + 1, res_x + 1) tensor of gradient angles.
    """
    ys = torch.arange(height, dtype=torch.float64) * res_y / height
    xs = torch.arange(width, dtype=torch.float64) * res_x / width
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    cy, cx = gy.floor().long(), gx.floor().long()
    ty, tx = gy - cy, gx - cx
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).double()

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[cy + dy, cx + dx]
        return g[..., 0] * (ty - dy) + g[..., 1] * (tx - dx)

    fy, fx = _fade(ty), _fade(tx)
    top = corner(0, 0) + fy * (corner(1, 0) - corner(0, 0))
    bottom = corner(0, 1) + fy * (corner(1, 1) - corner(0, 1))
    return (math.sqrt(2.0) * (top + fx * (bottom - top))).float()


@functools.lru_cache(maxsize=64)
def _pixel_centres(size: int) -> torch.Tensor:
    """Normalised pixel-centre coordinates along one axis (``align_corners=False`` convention)."""
    return (torch.arange(size, dtype=torch.float32) * 2.0 + 1.0) / size - 1.0


def rotate_batch(images: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """Rotate each (B, C, H, W) image about its centre by its own angle; bilinear, zero fill.

    The rotation is done in pixel units, so non-square images are rotated without shearing. The
    sampling grid is one broadcast sum of per-row and per-column parts (cheaper than ``affine_grid``).
    """
    batch, _, height, width = images.shape
    theta = torch.deg2rad(angles_deg.float().reshape(batch))
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]  # (B, 1, 1)
    xs, ys = _pixel_centres(width), _pixel_centres(height)
    aspect = width / height
    # Output pixel (x, y) samples the input at R(theta) (x, y), rotation taken in pixel units;
    # the (B, H, W, 2) grid is one broadcast sum of a per-column and a per-row part.
    column_part = torch.stack([cos * xs, sin * aspect * xs], dim=-1)  # (B, 1, W, 2)
    row_part = torch.stack([-sin / aspect * ys[:, None], cos * ys[:, None]], dim=-1)  # (B, H, 1, 2)
    grid = column_part + row_part
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def perlin_resolutions(
    batch: int, generator: torch.Generator | None = None, min_scale_exp: int = 0, max_scale_exp: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample lattice resolutions ``(res_y, res_x)``: ``2**k``, ``k`` uniform in [min, max) per axis.

    The two axes are drawn independently; the defaults are the official ones (``k`` in {0..5},
    i.e. 1..32 cells per axis).
    """
    exps = torch.randint(min_scale_exp, max_scale_exp, (2, batch), generator=generator)
    return 2 ** exps[0], 2 ** exps[1]


def rotation_angles(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample rotation angles in degrees, uniform in [-90, 90] (imgaug ``Affine(rotate=(-90, 90))``)."""
    return torch.rand(batch, generator=generator) * 180.0 - 90.0


MASK_SHAPES = ("perlin", "cracks", "mixed")


def check_mask_shape(mask_shape: str) -> str:
    """``mask_shape`` if it is one of :data:`MASK_SHAPES`; anything else is a one-line InputError."""
    if not isinstance(mask_shape, str) or mask_shape not in MASK_SHAPES:
        raise InputError(f"mask_shape: expected one of {', '.join(MASK_SHAPES)}, got {mask_shape!r}")
    return mask_shape


def _check_size(batch: int, height: int, width: int, min_scale_exp: int, max_scale_exp: int) -> None:
    if batch < 0 or height < 1 or width < 1:
        raise InputError(f"perlin_masks: expected batch >= 0 and a positive size, got {batch}x{height}x{width}")
    if not 0 <= min_scale_exp < max_scale_exp:
        raise InputError(f"min_scale_exp/max_scale_exp: expected 0 <= min < max, got {min_scale_exp}, {max_scale_exp}")


def _blob_masks_bool(
    batch: int, height: int, width: int, generator: torch.Generator | None,
    min_scale_exp: int, max_scale_exp: int, threshold: float, rotate: bool,
) -> torch.Tensor:
    """The official blob masks (``noise > threshold``), arguments already checked."""
    if batch == 0:
        return torch.zeros(0, 1, height, width, dtype=torch.bool)
    res_y, res_x = perlin_resolutions(batch, generator, min_scale_exp, max_scale_exp)
    noise = perlin_noise(batch, height, width, res_y, res_x, generator)[:, None]
    if rotate:
        noise = rotate_batch(noise, rotation_angles(batch, generator))
    return noise > threshold


CRACK_HALF_WIDTH = (0.015, 0.03)  # |noise| band: about 2-5 pixels wide at 256 x 256
CRACK_LINE_SCALE_EXPS = (1, 3)  # 2 or 4 cells per axis: long, gently curved lines
CRACK_REGION_SCALE_EXPS = (0, 2)  # 1 or 2 cells per axis: one region of the image keeps its lines
CRACK_REGION_THRESHOLD = 0.1


def crack_masks_bool(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    *,
    half_width: tuple[float, float] = CRACK_HALF_WIDTH,
    line_scale_exps: tuple[int, int] = CRACK_LINE_SCALE_EXPS,
    region_scale_exps: tuple[int, int] = CRACK_REGION_SCALE_EXPS,
    region_threshold: float = CRACK_REGION_THRESHOLD,
    rotate: bool = True,
) -> torch.Tensor:
    """Thin, crack-shaped masks, bool (B, 1, H, W): thin defects such as cracks are not blob-shaped.

    Per sample: a band ``|n1| < w`` around the zero level set of a Perlin noise ``n1`` (lattice
    ``2**k`` per axis, ``k`` uniform in ``[line_scale_exps)``; half-width ``w`` uniform in
    ``half_width``, in noise units, so the width scales with the image), kept only where a second,
    coarser Perlin noise ``n2 > region_threshold`` (``k`` in ``[region_scale_exps)``), so that each
    crack is local rather than a net over the whole image. Both fields are rotated together by one
    angle uniform in [-90, 90] degrees before thresholding (the zero fill lies outside the region).
    At 256 x 256 with the defaults: about 2 % of the image, about 5 % of masks empty. Every random
    draw comes from ``generator``.
    """
    _check_size(batch, height, width, 0, 1)
    low, high = half_width
    if not 0.0 < low <= high:
        raise InputError(f"half_width: expected 0 < low <= high, got {low}, {high}")
    for name, (lo, hi) in (("line_scale_exps", line_scale_exps), ("region_scale_exps", region_scale_exps)):
        if not 0 <= lo < hi:
            raise InputError(f"{name}: expected 0 <= min < max, got {lo}, {hi}")
    if batch == 0:
        return torch.zeros(0, 1, height, width, dtype=torch.bool)
    line_y, line_x = perlin_resolutions(batch, generator, *line_scale_exps)
    lines = perlin_noise(batch, height, width, line_y, line_x, generator)
    region_y, region_x = perlin_resolutions(batch, generator, *region_scale_exps)
    region = perlin_noise(batch, height, width, region_y, region_x, generator)
    widths = low + (high - low) * torch.rand(batch, generator=generator)
    fields = torch.stack([lines, region], dim=1)  # (B, 2, H, W)
    if rotate:
        fields = rotate_batch(fields, rotation_angles(batch, generator))
    return (fields[:, :1].abs() < widths[:, None, None, None]) & (fields[:, 1:] > region_threshold)


def crack_choices(batch: int, mask_shape: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which samples get a crack mask, bool (B,): none, all, or each with probability 0.5 ("mixed").

    Only "mixed" draws from ``generator`` (so "perlin" masks stay the official ones, draw for draw).
    """
    check_mask_shape(mask_shape)
    if mask_shape == "mixed":
        return torch.rand(batch, generator=generator) < 0.5
    return torch.full((batch,), mask_shape == "cracks", dtype=torch.bool)


def shaped_masks_bool(
    cracks: torch.Tensor,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    *,
    min_scale_exp: int = 0,
    max_scale_exp: int = 6,
    threshold: float = 0.5,
    rotate: bool = True,
) -> torch.Tensor:
    """Masks (B, 1, H, W) with a crack where ``cracks[b]`` and an official blob elsewhere.

    Blobs are drawn first, then cracks. Callers that redraw some masks pass the same choices
    again, so a redraw keeps each sample's kind (and "mixed" stays half cracks).
    """
    cracks = torch.as_tensor(cracks, dtype=torch.bool).flatten()
    batch = int(cracks.numel())
    _check_size(batch, height, width, min_scale_exp, max_scale_exp)
    blob_index = torch.nonzero(~cracks).flatten()
    crack_index = torch.nonzero(cracks).flatten()
    if crack_index.numel() == 0:
        return _blob_masks_bool(batch, height, width, generator, min_scale_exp, max_scale_exp, threshold, rotate)
    masks = torch.zeros(batch, 1, height, width, dtype=torch.bool)
    if blob_index.numel():
        masks[blob_index] = _blob_masks_bool(
            int(blob_index.numel()), height, width, generator, min_scale_exp, max_scale_exp, threshold, rotate
        )
    masks[crack_index] = crack_masks_bool(int(crack_index.numel()), height, width, generator, rotate=rotate)
    return masks


def perlin_masks_bool(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    *,
    min_scale_exp: int = 0,
    max_scale_exp: int = 6,
    threshold: float = 0.5,
    rotate: bool = True,
    mask_shape: str = "perlin",
) -> torch.Tensor:
    """Like :func:`perlin_masks` but returns a bool tensor (cheaper to combine with other masks)."""
    _check_size(batch, height, width, min_scale_exp, max_scale_exp)
    check_mask_shape(mask_shape)
    if mask_shape == "perlin":
        return _blob_masks_bool(batch, height, width, generator, min_scale_exp, max_scale_exp, threshold, rotate)
    return shaped_masks_bool(
        crack_choices(batch, mask_shape, generator), height, width, generator,
        min_scale_exp=min_scale_exp, max_scale_exp=max_scale_exp, threshold=threshold, rotate=rotate,
    )


def perlin_masks(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    *,
    min_scale_exp: int = 0,
    max_scale_exp: int = 6,
    threshold: float = 0.5,
    rotate: bool = True,
    mask_shape: str = "perlin",
) -> torch.Tensor:
    """Binary Perlin masks, shape (B, 1, H, W), float32 in {0, 1}.

    Per sample: resolutions ``2**k`` per axis with ``k`` uniform in ``[min_scale_exp, max_scale_exp)``
    (official defaults 0 and 6, i.e. 1..32), a rotation uniform in [-90, 90] degrees, then
    ``noise > threshold``. As in the official code a mask may be empty (about 4 % at 256 x 256).
    ``mask_shape`` "cracks" gives thin crack masks instead (:func:`crack_masks_bool`; the scale and
    threshold options shape blobs only), "mixed" a crack or a blob per sample with probability 0.5.
    Every random draw comes from ``generator`` (the global torch RNG when None).
    """
    return perlin_masks_bool(
        batch, height, width, generator,
        min_scale_exp=min_scale_exp, max_scale_exp=max_scale_exp, threshold=threshold, rotate=rotate,
        mask_shape=mask_shape,
    ).float()
