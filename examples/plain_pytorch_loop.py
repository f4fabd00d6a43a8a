"""Synthetic anomalies in a plain PyTorch training loop (no `realnet`, no framework).

`sia.SyntheticAnomalyDataset` wraps any dataset of normal images; each item comes back as a dict with
the (maybe) anomalous `image`, its `clean_image`, the pixel `mask` and `is_synthetic`. Here a tiny
segmentation network learns to predict the mask, on the 28 normal hazelnut photos bundled with `sia`,
and is then scored on the real defects of the bundled test set (pixel AUROC).

    python examples/plain_pytorch_loop.py                  # ~1 minute on a CPU
    python examples/plain_pytorch_loop.py --steps 5        # a smoke run
    python examples/plain_pytorch_loop.py --source dtd:../shared/data/dtd/images

The anomaly content comes from `--source`: `cutpaste` (patches of the same photo, needs nothing),
`dtd:FOLDER` (texture photos) or an SIA folder made with `sia generate` / `realnet demo`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import sia
from sia.images import list_images, load_image_tensor, load_mask
from sia.synthesizer import AnomalySynthesizer, SyntheticAnomalyDataset

HAZELNUTS = Path(sia.__file__).resolve().parent / "assets" / "hazelnut"


class NormalImages(Dataset):
    """The simplest possible dataset of normal images: files -> (3, S, S) tensors in [0, 1]."""

    def __init__(self, folder: Path, size: int) -> None:
        self.files = list_images(folder)
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image_tensor(self.files[index], size=(self.size, self.size))


class TinySegmenter(nn.Module):
    """Four convolutions: an image in, one anomaly logit per pixel out."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.ReLU(),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--source", default="cutpaste", help="anomaly source: cutpaste, dtd:FOLDER or an SIA folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    synthesizer = AnomalySynthesizer(args.source, category="hazelnut-toy", require_nonempty=True)
    train_set = SyntheticAnomalyDataset(NormalImages(HAZELNUTS / "train" / "good", args.size), synthesizer,
                                        probability=0.5, seed=args.seed)
    model = TinySegmenter()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    step, epoch = 0, 0
    while step < args.steps:
        train_set.set_epoch(epoch)  # new, reproducible anomalies every epoch
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(args.seed + epoch))
        for batch in loader:
            logits = model(batch["image"])
            # Anomalous pixels are rare: weight them up so the network cannot just answer "normal".
            positive = batch["mask"].mean().clamp(min=1e-3)
            loss = F.binary_cross_entropy_with_logits(logits, batch["mask"], pos_weight=(1 - positive) / positive)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % max(1, args.steps // 10) == 0 or step == args.steps:
                print(f"step {step:4d}  loss {loss.item():.4f}  synthetic in batch {int(batch['is_synthetic'].sum())}")
            if step >= args.steps:
                break
        epoch += 1

    # Score the real defects of the bundled test set (masks share the image's stem).
    test_files = list_images(HAZELNUTS / "test")
    images = torch.stack([load_image_tensor(f, size=(args.size, args.size)) for f in test_files])
    masks = torch.stack([
        load_mask(HAZELNUTS / "ground_truth" / f.parent.name / f"{f.stem}.png", size=(args.size, args.size))
        if f.parent.name != "good" else torch.zeros(1, args.size, args.size)
        for f in test_files
    ])
    with torch.no_grad():
        scores = torch.sigmoid(model(images))
    try:
        from realnet.metrics import pixel_auroc

        print(f"pixel AUROC on {len(test_files)} real test photos: {pixel_auroc(scores[:, 0].numpy(), masks[:, 0].numpy()):.3f}")
    except ImportError:
        print("(install realnet to score the test photos)")


if __name__ == "__main__":
    main()
