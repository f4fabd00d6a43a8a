"""Speed of one SDAS diffusion training step (hybrid loss, learned sigma) on one CPU thread.

Protocol of docs/performance-anchors.md: fp32, random weights, 15 classes (MVTec AD), the small-64
preset (width 64, mult 1,2,2,2, ~10.7 M parameters) at batch 8 and 64x64, one thread
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``; run under ``taskset -c 0`` to pin it),
2 warm-up steps, median of 7 timed steps. The step uses exactly the training loop's pieces
(`sia.diffusion_loss.hybrid_loss`, `sia.training.make_adam` (fused on CPU), `clip_grad_norm_(1.0)`,
`EMAWeights`):

* forward+loss: draw t and noise, q(x_t | x_0), UNet forward, L_simple + L_vlb;
* backward+clip: backward pass and gradient-norm clipping;
* optimizer+EMA: Adam step, zero_grad, EMA update.

Anchor (official code, same machine and protocol): 1.94 s = 0.71 + 1.20 + 0.04.

    taskset -c 0 .venv/bin/python benchmarks/diffusion_train.py   # writes benchmarks/out/diffusion_train.json
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

PRESET, BATCH, NUM_CLASSES, WARMUP, TIMED = "small-64", 8, 15, 2, 7
ANCHOR = {"total_s": 1.94, "forward_loss_s": 0.71, "backward_clip_s": 1.20, "optimizer_ema_s": 0.04}
PHASES = ("forward_loss_s", "backward_clip_s", "optimizer_ema_s")


def training_setup(preset: str = PRESET, batch: int = BATCH, num_classes: int = NUM_CLASSES):
    """The training step's parts as `sia train` builds them, random weights, seeded: the same for every benchmark."""
    import torch

    from sia.diffusion_loss import DiffusionCoefficients
    from sia.scheduler import SDASScheduler
    from sia.training import EMAWeights, make_adam
    from sia.unets import build_unet

    torch.manual_seed(0)
    unet = build_unet(preset, num_classes=num_classes).train()
    ema = EMAWeights(unet, 0.9999)
    optimizer = make_adam(unet.parameters(), "cpu", lr=1e-4)
    coefficients = DiffusionCoefficients.from_scheduler(SDASScheduler())
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    labels = torch.arange(batch) % num_classes
    return unet, ema, optimizer, coefficients, generator, x0, labels


def measure() -> dict:
    import torch

    from sia.diffusion_loss import add_noise, hybrid_loss

    torch.set_num_threads(1)
    unet, ema, optimizer, coefficients, generator, x0, labels = training_setup()

    rows = []
    for i in range(WARMUP + TIMED):
        start = time.perf_counter()
        timesteps = torch.randint(0, 1000, (BATCH,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = add_noise(x0, noise, timesteps, coefficients)
        output = unet(x_t, timesteps, class_labels=labels).sample
        loss = hybrid_loss(output, x0, x_t, noise, timesteps, coefficients=coefficients)["loss"]
        forward_done = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        backward_done = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(unet)
        end = time.perf_counter()
        if i >= WARMUP:
            rows.append({"forward_loss_s": forward_done - start, "backward_clip_s": backward_done - forward_done,
                         "optimizer_ema_s": end - backward_done, "total_s": end - start})

    result = {key: round(statistics.median(r[key] for r in rows), 4) for key in (*PHASES, "total_s")}
    return {
        "preset": PRESET, "batch": BATCH, "image_size": unet.config.sample_size, "num_classes": NUM_CLASSES,
        "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        "warmup_steps": WARMUP, "timed_steps": TIMED, "median": result,
        "step_times_s": [round(r["total_s"], 4) for r in rows],
        "anchor_official": ANCHOR, "speedup_vs_official": round(ANCHOR["total_s"] / result["total_s"], 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "pinned_cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1min_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    result = measure()
    print(f"diffusion training step, {result['preset']} ({result['params_m']} M params), batch {result['batch']}, "
          f"{result['image_size']}px, {result['threads']} thread, median of {result['timed_steps']}")
    print(f"{'phase':<18}{'ours (s)':>10}{'official (s)':>14}")
    for key, label in (("forward_loss_s", "forward+loss"), ("backward_clip_s", "backward+clip"),
                       ("optimizer_ema_s", "optimizer+EMA"), ("total_s", "total")):
        print(f"{label:<18}{result['median'][key]:>10.3f}{ANCHOR[key]:>14.2f}")
    print(f"speed-up vs official: {result['speedup_vs_official']}x; peak RSS {result['peak_rss_mib']} MiB; "
          f"machine load average {result['load_average_1min_after']} (timings are only comparable on an idle core)")
    out = Path(__file__).resolve().parent / "out" / "diffusion_train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
