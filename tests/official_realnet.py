"""A compact, independent RealNet (architecture A) with the official module names, for tests only.

Module tree and arithmetic follow the official `ModelHelper` (backbone -> afs -> recon -> rrs):
`backbone.feature_extractor` (timm features_only), `afs.indexes.block<i>_layer<j>`,
`recon.block<i>_recon` (GN/attention U-Net with un-wrapped down-sampling ResBlocks and
ConvTranspose up-sampling), `rrs.bn_idx` and `rrs.decoder1..3`. Inputs are normalised with the
ImageNet statistics, as the official data pipeline does.
"""

from __future__ import annotations

import math

import timm
import torch
from torch import nn
from torch.nn import functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _gn(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch)


class ResBlock(nn.Module):
    def __init__(self, ch, out=None, up=False, down=False):
        super().__init__()
        out = out or ch
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(_gn(ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        if up:
            self.h_upd = nn.Module()
            self.h_upd.conv = nn.ConvTranspose2d(ch, ch, 4, 2, 1)
            self.x_upd = nn.Module()
            self.x_upd.conv = nn.ConvTranspose2d(ch, ch, 4, 2, 1)
        self.skip_connection = nn.Identity() if out == ch else nn.Conv2d(ch, out, 1)

    def forward(self, x):
        h = self.in_layers[1](self.in_layers[0](x))
        if self.up:
            h, x = self.h_upd.conv(h), self.x_upd.conv(x)
        elif self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        return self.skip_connection(x) + self.in_layers[2](h)


class AttentionBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.heads = ch // 64
        self.norm = _gn(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        flat = x.reshape(b, c, -1)
        d = c // self.heads
        q, k, v = self.qkv(self.norm(flat)).reshape(b * self.heads, 3 * d, -1).split(d, dim=1)
        s = 1 / math.sqrt(math.sqrt(d))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        return (flat + self.proj_out(a)).reshape(b, c, hh, ww)


class ReconUNet(nn.Module):
    def __init__(self, channels, mc, mult, num_res_blocks, attention_mult):
        super().__init__()
        ch = mc * mult[0]
        self.input_blocks = nn.ModuleList([nn.Conv2d(channels, ch, 3, padding=1)])
        skips, ds = [ch], 1
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, mc * m)]
                ch = mc * m
                if ds in attention_mult:
                    layers.append(AttentionBlock(ch))
                self.input_blocks.append(nn.Sequential(*layers))
                skips.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(ResBlock(ch, down=True))  # not wrapped, as in the official code
                skips.append(ch)
                ds *= 2
        self.middle_block = nn.Sequential(ResBlock(ch), AttentionBlock(ch), ResBlock(ch))
        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mc * m)]
                ch = mc * m
                if ds in attention_mult:
                    layers.append(AttentionBlock(ch))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, up=True))
                    ds //= 2
                self.output_blocks.append(nn.Sequential(*layers))
        self.out = nn.Sequential(_gn(ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1))

    def forward(self, x):
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h)
            hs.append(h)
        h = self.middle_block(h)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], 1))
        return self.out(h)


class _Residual(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self._block = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.ReLU(),
                                    nn.Conv2d(ch, ch, 1, bias=False))

    def forward(self, x):
        return x + self._block(x)


class _ResidualStack(nn.Module):
    def __init__(self, ch, n):
        super().__init__()
        self._layers = nn.ModuleList([_Residual(ch) for _ in range(n)])

    def forward(self, x):
        for layer in self._layers:
            x = layer(x)
        return F.relu(x)


class OfficialRealNet(nn.Module):
    def __init__(self, backbone="resnet18", layers=(2, 3), planes=(128, 128), strides=(8, 16),
                 mode_numbers=(32, 32), num_res_blocks=1, channel_mult=(1, 2), attention_mult=(2,), residual_layers=2):
        super().__init__()
        self.layer_names = [f"layer{i}" for i in layers]
        self.strides = strides
        self.mode_numbers = mode_numbers
        self.backbone = nn.Module()
        self.backbone.feature_extractor = timm.create_model(backbone, pretrained=False, features_only=True,
                                                            out_indices=list(layers))
        self.afs = nn.Module()
        self.afs.indexes = nn.ParameterDict({
            f"block{i + 1}_{name}": nn.Parameter(torch.zeros(p).long(), requires_grad=False)
            for i, (name, p) in enumerate(zip(self.layer_names, planes))
        })
        self.recon = nn.Module()
        for i, p in enumerate(planes):
            self.recon.add_module(f"block{i + 1}_recon", ReconUNet(p, p // 2, channel_mult, num_res_blocks, attention_mult))
        self.rrs = nn.Module()
        self.rrs.bn_idx = nn.BatchNorm2d(sum(planes), momentum=0.9, affine=False)
        k = sum(mode_numbers)
        self.rrs.decoder1 = nn.Sequential(_ResidualStack(k, residual_layers), nn.Conv2d(k, 128, 3, padding=1),
                                          nn.BatchNorm2d(128), nn.ReLU())
        self.rrs.decoder2 = nn.Sequential(nn.Conv2d(128, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1), nn.ReLU())
        self.rrs.decoder3 = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))

    def forward(self, image):
        out = self.intermediates(image)
        return out["logits"], out["anomaly_map"]

    def intermediates(self, image):
        """Every tensor of the forward pass: selected features, reconstructions, residuals, RRS indices, outputs."""
        feats = self.backbone.feature_extractor((image - MEAN) / STD)
        features, reconstructions, residuals = [], [], []
        for i, feat in enumerate(feats):
            x = torch.index_select(feat, 1, self.afs.indexes[f"block{i + 1}_{self.layer_names[i]}"].data)
            recon = getattr(self.recon, f"block{i + 1}_recon")(x)
            features.append(x)
            reconstructions.append(recon)
            residuals.append((x - recon) ** 2)
        align = min(self.strides)
        residual = torch.cat([F.interpolate(r, scale_factor=s / align, mode="bilinear", align_corners=True) if s != align else r
                              for r, s in zip(residuals, self.strides)], 1)
        ranking = self.rrs.bn_idx(residual)
        b, _, h, w = residual.shape
        chosen, indices, scores = [], [], []
        for mode, k in zip(("max", "mean"), self.mode_numbers):
            flat = ranking.view(b, -1, h * w)
            score = flat.max(-1)[0] if mode == "max" else flat.mean(-1)
            idx = torch.topk(score, k, dim=1, largest=True, sorted=True)[1]
            chosen.append(torch.gather(residual, 1, idx.view(b, k, 1, 1).repeat(1, 1, h, w)))
            indices.append(idx)
            scores.append(score)
        x = self.rrs.decoder2(self.rrs.decoder1(torch.cat(chosen, 1)))
        x = F.interpolate(x, (x.size(-1) * 2,) * 2, mode="bilinear", align_corners=True)
        logit = F.interpolate(self.rrs.decoder3(x), image.shape[-2:], mode="bilinear", align_corners=True)
        return {"features": features, "reconstructions": reconstructions, "residuals": residuals,
                "rrs_indices": torch.cat(indices, 1), "rrs_scores": scores, "logits": logit,
                "anomaly_map": torch.softmax(logit, 1)[:, 1:2]}


def randomize_(model: OfficialRealNet, generator: torch.Generator, scale: float = 0.05) -> OfficialRealNet:
    """Random weights everywhere (including zero-initialised convs), random AFS indices and BN statistics."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("afs."):
                continue
            if name.endswith("weight") and param.ndim == 1:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(scale * torch.randn(param.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
        for i, (key, index) in enumerate(model.afs.indexes.items()):
            channels = model.backbone.feature_extractor.feature_info.channels()[i]
            chosen = torch.randperm(channels, generator=generator)[: index.numel()].sort().values
            index.data.copy_(chosen)
    return model
