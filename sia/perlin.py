"""Batched Perlin-noise masks: the shape prior of the synthetic anomalies (DRAEM's generator).

The official RealNet code draws, for every sample, a single-octave Perlin noise with per-axis
lattice resolutions ``2**k`` (``k`` uniform in ``{0..5}``), rotates it by a uniform angle in
[-90, 90] degrees (bilinear, zero fill) and thresholds it at 0.5. This module does the same for a
whole batch at once, with mixed resolutions inside the batch, for any ``H x W``.

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
) -> torch.Tensor:
    """Like :func:`perlin_masks` but returns a bool tensor (cheaper to combine with other masks)."""
    if batch < 0 or height < 1 or width < 1:
        raise InputError(f"perlin_masks: expected batch >= 0 and a positive size, got {batch}x{height}x{width}")
    if not 0 <= min_scale_exp < max_scale_exp:
        raise InputError(f"min_scale_exp/max_scale_exp: expected 0 <= min < max, got {min_scale_exp}, {max_scale_exp}")
    if batch == 0:
        return torch.zeros(0, 1, height, width, dtype=torch.bool)
    res_y, res_x = perlin_resolutions(batch, generator, min_scale_exp, max_scale_exp)
    noise = perlin_noise(batch, height, width, res_y, res_x, generator)[:, None]
    if rotate:
        noise = rotate_batch(noise, rotation_angles(batch, generator))
    return noise > threshold


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
) -> torch.Tensor:
    """Binary Perlin masks, shape (B, 1, H, W), float32 in {0, 1}.

    Per sample: resolutions ``2**k`` per axis with ``k`` uniform in ``[min_scale_exp, max_scale_exp)``
    (official defaults 0 and 6, i.e. 1..32), a rotation uniform in [-90, 90] degrees, then
    ``noise > threshold``. As in the official code a mask may be empty (about 4 % at 256 x 256).
    Every random draw comes from ``generator`` (the global torch RNG when None).
    """
    return perlin_masks_bool(
        batch, height, width, generator,
        min_scale_exp=min_scale_exp, max_scale_exp=max_scale_exp, threshold=threshold, rotate=rotate,
    ).float()
