"""`sia` anomalies in a DRAEM-style data flow (the batch layout anomalib's DRAEM uses), without anomalib.

DRAEM (Zavrtanik et al., ICCV 2021) trains a reconstructive network to restore the normal image and a
discriminative network to segment the anomaly. Its training batch holds the normal `image`, the
`augmented_image` (a synthetic anomaly, or the image itself) and the `anomaly_mask`, plus
`has_anomaly`; anomalib's DRAEM builds the last three inside `training_step` from `batch["image"]`
with `augmented_image, anomaly_mask = augmenter(image)`. `SiaAugmenter` below is a drop-in for that
augmenter, backed by `sia.AnomalySynthesizer` (foreground-aware masks, SIA/DTD/CutPaste sources), and
`collate_draem_batch` builds the same dict in a DataLoader instead.

    python examples/anomalib_draem_style.py                # ~1 minute on a CPU
    python examples/anomalib_draem_style.py --steps 5      # a smoke run

With anomalib installed, pass a `SiaAugmenter` where its DRAEM model calls its own augmenter; the
keys and shapes here are the ones that code expects (images (B,3,H,W) in [0,1], masks (B,1,H,W)).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import sia
from sia.images import list_images, load_image_tensor
from sia.synthesizer import AnomalySynthesizer

HAZELNUTS = Path(sia.__file__).resolve().parent / "assets" / "hazelnut"


class SiaAugmenter:
    """`augmented_image, anomaly_mask = augmenter(image_batch)`, like DRAEM's augmenter.

    Each image becomes anomalous with probability `probability` (DRAEM: 0.5); the others come back
    unchanged with an empty mask. Randomness comes from one seeded generator.
    """

    def __init__(self, source: str = "cutpaste", category="hazelnut-toy", probability: float = 0.5,
                 opacity=(0.1, 1.0), seed: int = 0) -> None:
        # DRAEM blends with beta ~ U(0.1, 1.0); RealNet's SIA default would be (0.5, 1.0).
        self.synthesizer = AnomalySynthesizer(source, category=category, opacity=opacity, require_nonempty=True)
        self.probability = probability
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.synthesizer.synthesize_batch(images, self.generator, probability=self.probability)

    augment_batch = __call__  # the older anomalib name


def collate_draem_batch(augmenter: SiaAugmenter):
    """A DataLoader `collate_fn` producing DRAEM's training batch dict from normal images."""

    def collate(images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        image = torch.stack(images)
        augmented_image, anomaly_mask = augmenter(image)
        has_anomaly = anomaly_mask.flatten(1).amax(dim=1, keepdim=True)
        return {"image": image, "augmented_image": augmented_image, "anomaly_mask": anomaly_mask,
                "has_anomaly": has_anomaly}

    return collate


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class TinyDraem(nn.Module):
    """DRAEM's two sub-networks, shrunk: reconstruct the image, then segment from (input, reconstruction)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.reconstructive = nn.Sequential(conv_block(3, width), nn.MaxPool2d(2), conv_block(width, 2 * width),
                                            nn.Upsample(scale_factor=2), conv_block(2 * width, width),
                                            nn.Conv2d(width, 3, 1), nn.Sigmoid())
        self.discriminative = nn.Sequential(conv_block(6, width), conv_block(width, width), nn.Conv2d(width, 2, 1))

    def forward(self, augmented_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction = self.reconstructive(augmented_image)
        prediction = self.discriminative(torch.cat([augmented_image, reconstruction], dim=1))
        return reconstruction, prediction


def draem_loss(image, reconstruction, anomaly_mask, prediction, gamma: float = 2.0) -> torch.Tensor:
    """L2 reconstruction + focal loss on the 2-class segmentation (DRAEM also adds SSIM; left out here)."""
    l2 = F.mse_loss(reconstruction, image)
    log_p = F.log_softmax(prediction, dim=1)
    target = anomaly_mask[:, 0].long()
    log_pt = log_p.gather(1, target[:, None])[:, 0]
    focal = (-(1 - log_pt.exp()) ** gamma * log_pt).mean()
    return l2 + focal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--source", default="cutpaste", help="cutpaste, dtd:FOLDER or an SIA folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    normals = [load_image_tensor(f, size=(args.size, args.size)) for f in list_images(HAZELNUTS / "train" / "good")]
    augmenter = SiaAugmenter(args.source, seed=args.seed)
    loader = DataLoader(normals, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate_draem_batch(augmenter), generator=torch.Generator().manual_seed(args.seed))
    model = TinyDraem()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    step = 0
    while step < args.steps:
        for batch in loader:
            reconstruction, prediction = model(batch["augmented_image"])
            loss = draem_loss(batch["image"], reconstruction, batch["anomaly_mask"], prediction)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == 1:
                print("batch keys:", {k: tuple(v.shape) for k, v in batch.items()})
            if step % max(1, args.steps // 10) == 0 or step == args.steps:
                print(f"step {step:4d}  loss {loss.item():.4f}  anomalous {int(batch['has_anomaly'].sum())}/{len(batch['image'])}")
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
