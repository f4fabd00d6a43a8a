"""Reconstruction U-Nets: any channel count / spatial size, zero init, legacy attention, official size."""

from __future__ import annotations

import math

import pytest
import torch

from realnet import recon
from realnet.recon import AttentionBlock, ReconstructionNetworks, ReconstructionUNet, group_count, head_count


@pytest.mark.parametrize("channels", [1, 7, 12, 24, 40, 64, 96, 112, 128, 320, 1024])
def test_group_and_head_counts_always_divide(channels):
    groups, heads = group_count(channels), head_count(channels)
    assert channels % groups == 0 and 1 <= groups <= 32
    assert channels // groups >= 2 or channels == 1  # GroupNorm stays defined on 1x1 maps
    assert channels % heads == 0 and 1 <= heads <= max(1, channels // 64)
    if channels % 32 == 0:
        assert groups == 32  # identical to the official GroupNorm(32, C)
    if channels % 64 == 0:
        assert heads == channels // 64  # identical to the official head count


@pytest.mark.parametrize("channels,size", [(24, (16, 16)), (37, (5, 7)), (40, (2, 3)), (13, (1, 1)), (16, (16, 24)), (1, (2, 2))])
def test_shapes_and_zero_reconstruction_at_init(channels, size):
    torch.manual_seed(0)
    unet = ReconstructionUNet(channels)
    x = torch.randn(2, channels, *size)
    y = unet(x)
    assert y.shape == x.shape
    assert torch.count_nonzero(y) == 0


def test_residual_is_squared_difference_and_gradients_reach_the_input_conv():
    torch.manual_seed(0)
    nets = ReconstructionNetworks([12, 20])
    feats = [torch.randn(2, 12, 8, 12), torch.randn(2, 20, 4, 6)]
    recons, residuals = nets(feats)
    for f, r in zip(feats, residuals):
        torch.testing.assert_close(r, f.pow(2))  # reconstruction is 0 at init
    torch.nn.init.normal_(nets.unets[0].out[-1].weight, std=0.1)
    recons, residuals = nets(feats)
    torch.testing.assert_close(residuals[0], (feats[0] - recons[0]).pow(2))
    residuals[0].mean().backward()
    assert nets.unets[0].input_blocks[0].weight.grad.abs().sum() > 0


def test_attention_equals_legacy_multi_head_attention():
    torch.manual_seed(0)
    block = AttentionBlock(128)  # 2 heads of 64 channels
    torch.nn.init.normal_(block.proj_out.weight, std=0.05)
    x = torch.randn(2, 128, 4, 6)
    b, c, t = 2, 128, 24
    qkv = block.qkv(block.norm(x.reshape(b, c, t)))
    q, k, v = qkv.reshape(b * 2, 3 * 64, t).split(64, dim=1)  # per head q|k|v, legacy layout
    scale = 1 / math.sqrt(math.sqrt(64))
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    attended = torch.einsum("bts,bcs->bct", weights, v).reshape(b, c, t)
    expected = (x.reshape(b, c, t) + block.proj_out(attended)).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_parameter_counts_equal_the_official_network():
    """The official architecture A has 51.85 M parameters for C = 256 and 207.27 M for C = 512."""
    with torch.device("meta"):
        small, large = ReconstructionUNet(256), ReconstructionUNet(512)
    assert round(sum(p.numel() for p in small.parameters()) / 1e6, 2) == 51.85
    assert round(sum(p.numel() for p in large.parameters()) / 1e6, 2) == 207.27


@pytest.mark.parametrize("batch,size", [(1, (4, 4)), (2, (3, 4)), (1, (1, 1))])
def test_small_map_matrix_product_path_equals_the_default_convolutions(batch, size):
    """Deep levels on CPU run as im2col matrix products: same values and gradients as nn.Conv2d."""
    torch.manual_seed(0)
    conv, up = recon.Conv2d(96, 48, 3, padding=1), recon.ConvTranspose2d(96, 96, 4, stride=2, padding=1)
    x = torch.randn(batch, 96, *size, requires_grad=True)
    assert recon._use_gemm(x, 96)
    for layer, reference in ((conv, torch.nn.functional.conv2d), (up, torch.nn.functional.conv_transpose2d)):
        out = layer(x)
        kwargs = dict(padding=layer.padding, stride=layer.stride)
        expected = reference(x, layer.weight, layer.bias, **kwargs)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_a_channels_last_unet_runs_and_matches_the_contiguous_one():
    """`.to(memory_format=torch.channels_last)` used to break the small-map matrix-product path."""
    torch.manual_seed(0)
    unet = recon.ReconstructionUNet(64, channel_mult=(1, 2), attention_mult=(2,)).eval()
    torch.nn.init.normal_(unet.out[-1].weight, std=0.05)
    x = torch.randn(1, 64, 4, 6)
    assert recon._use_gemm(torch.zeros(1, 32, 2, 3), 64)  # the deep level takes the matrix-product path
    with torch.no_grad():
        expected = unet(x)
        fast = unet.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
