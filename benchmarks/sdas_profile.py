"""Where the time of an SDAS sampling step and training step goes, per op, on one CPU thread.

Same protocol as benchmarks/sdas.py and benchmarks/diffusion_train.py (fp32, random weights,
small-64, 15 classes, batch 8, one thread; run under ``taskset -c 0``). Two parts:

* per-op profile (torch.profiler, self CPU time): one sampling step (UNet forward +
  `SDASScheduler.step`, as the pipeline runs it) and one training step (noise, forward, hybrid loss,
  backward, clipping, Adam, EMA, as the training loop runs it), each op put in a class (convolution,
  GroupNorm, SiLU, attention, ...) and each stretch of our own code timed as a region;
* same-process A/B, alternating the variants round by round and quoting the median of the paired
  ratios (a shared machine's load changes by the minute, so absolute seconds are not comparable
  across runs but adjacent rounds are): our UNet with and without the channels-last sampling input,
  the independent official-arithmetic ADM of tests/official_adm.py in the architecture the official
  figures were measured with, which is the small-64 preset's (the official yaml's
  ``attention_resolutions`` [32, 16, 8] read as downsample factors on a 64 px image: attention at
  8 px only, 64-channel heads, 10.74 M parameters), and Adam's per-tensor loop against the fused kernel.

    taskset -c 0 .venv/bin/python benchmarks/sdas_profile.py [--rounds N]   # writes benchmarks/out/sdas_profile.json
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
PRESET, BATCH, NUM_CLASSES = "small-64", 8, 15
OFFICIAL_ANCHOR = "official-style ADM, anchors' architecture"
# The op classes, first match wins (profiler op names contain these).
OP_CLASSES = (
    ("convolution", ("conv", "thnn_")),
    ("GroupNorm", ("group_norm",)),
    ("SiLU", ("silu",)),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention", "bmm", "softmax")),
    ("linear", ("addmm", "aten::mm", "aten::linear")),
    ("up/down-sampling", ("upsample", "avg_pool")),
    ("copies, cat", ("copy_", "aten::cat", "clone", "contiguous", "_to_copy")),
    ("optimizer, EMA, clipping", ("_foreach", "_fused_adam", "lerp", "addcdiv", "addcmul", "vector_norm")),
)


def op_class(name: str) -> str:
    for label, keys in OP_CLASSES:
        if any(key in name for key in keys):
            return label
    return "elementwise, other"


def profile_table(run: Callable[[], None], steps: int) -> dict:
    """Self CPU ms per step: by op class, by our code's regions (``## name`` record_function), top ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    ops = [e for e in events if not e.key.startswith("## ")]
    total = sum(e.self_cpu_time_total for e in ops)
    classes: collections.Counter = collections.Counter()
    for e in ops:
        classes[op_class(e.key)] += e.self_cpu_time_total

    def ms(value: float) -> float:
        return round(value / 1e3 / steps, 2)

    return {
        "total_ms": ms(total),
        "classes": {k: {"ms": ms(v), "share": round(v / total, 4)} for k, v in classes.most_common()},
        "regions": {e.key[3:]: {"ms": ms(e.cpu_time_total), "share": round(e.cpu_time_total / total, 4)}
                    for e in sorted(events, key=lambda e: -e.cpu_time_total) if e.key.startswith("## ")},
        "top_ops": [{"op": e.key, "ms": ms(e.self_cpu_time_total), "share": round(e.self_cpu_time_total / total, 4),
                     "calls_per_step": e.count // steps}
                    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:12]],
    }


def paired(variants: dict[str, Callable[[], object]], rounds: int, references: tuple[str, ...]) -> dict:
    """CPU seconds of each variant, alternated round by round; speed-ups over each reference row are
    medians (and quartiles) of the per-round ratios ``reference time / variant time``."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for run in variants.values():
        run()  # warm-up
    for index in range(rounds):
        order = list(variants) if index % 2 == 0 else list(variants)[::-1]  # ABBA: no variant always runs first
        for name in order:
            start = time.process_time()
            variants[name]()
            times[name].append(time.process_time() - start)
    rows = {}
    for name, values in times.items():
        speedups = {}
        for reference in references:
            ratios = [a / b for a, b in zip(times[reference], values)]
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            speedups[reference] = [round(statistics.median(ratios), 3), round(quartiles[0], 3), round(quartiles[2], 3)]
        rows[name] = {"median_cpu_s": round(statistics.median(values), 4), "speedup_over": speedups}
    return rows


def official_style():
    """The official-arithmetic ADM (tests/official_adm.py) as the anchors' network (= the small-64 preset)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from official_adm import OfficialADM

    return OfficialADM(model_channels=64, num_res_blocks=2, channel_mult=(1, 2, 2, 2), num_classes=NUM_CLASSES,
                       attention_ds=(8,), head_channels=64)


def architectures() -> dict:
    """Parameter counts and attention placement of our preset and of the official-style build."""
    import torch

    from sia.unets import build_unet

    with torch.device("meta"):
        models = {"ours (small-64 preset)": (build_unet(PRESET, num_classes=NUM_CLASSES), [8], 64),
                  OFFICIAL_ANCHOR: (official_style(), [8], 64)}
    return {name: {"params": sum(p.numel() for p in model.parameters()), "attention_px": px, "head_channels": heads}
            for name, (model, px, heads) in models.items()}


def sampling(rounds: int) -> dict:
    import torch
    from torch.profiler import record_function

    from sia.scheduler import SDASScheduler
    from sia.unets import build_unet, unet_input

    torch.manual_seed(0)
    unet = build_unet(PRESET, num_classes=NUM_CLASSES).eval()
    scheduler = SDASScheduler()
    scheduler.set_timesteps(20)
    size = unet.config.sample_size
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(BATCH) % NUM_CLASSES
    strength = torch.full((BATCH,), 0.15)
    t = scheduler.timesteps[3]

    def step() -> None:
        with record_function("## UNet forward (diffusers)"):
            output = unet(unet_input(x, unet.dtype), t, class_labels=labels).sample
        with record_function("## SDASScheduler.step (ours)"):
            scheduler.step(output, t, x, generator=torch.Generator().manual_seed(1), anomaly_strength=strength)

    anchor = official_style().eval()
    ts = torch.full((BATCH,), int(t))
    with torch.no_grad():
        step()
        table = profile_table(step, 2)
        ab = paired({
            OFFICIAL_ANCHOR: lambda: anchor(x, ts, labels),
            "ours, NCHW input (before)": lambda: unet(x, t, class_labels=labels),
            "ours, channels-last input (now)": lambda: unet(unet_input(x, unet.dtype), t, class_labels=labels),
        }, rounds, (OFFICIAL_ANCHOR, "ours, NCHW input (before)"))
    return {"profile": table, "ab_unet_forward": ab}


def training(rounds: int) -> dict:
    import torch
    from torch.profiler import record_function

    from diffusion_train import training_setup  # the same parts as the training-step benchmark
    from sia.diffusion_loss import add_noise, hybrid_loss

    unet, ema, optimizer, coefficients, generator, x0, labels = training_setup(PRESET, BATCH, NUM_CLASSES)

    def step() -> None:
        with record_function("## noise, q(x_t|x_0) (ours)"):
            timesteps = torch.randint(0, 1000, (BATCH,), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = add_noise(x0, noise, timesteps, coefficients)
        with record_function("## UNet forward (diffusers)"):
            output = unet(x_t, timesteps, class_labels=labels).sample
        with record_function("## hybrid loss incl. L_vlb (ours)"):
            loss = hybrid_loss(output, x0, x_t, noise, timesteps, coefficients=coefficients)["loss"]
        with record_function("## backward (autograd through diffusers)"):
            loss.backward()
        with record_function("## clip_grad_norm_ (torch)"):
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        with record_function("## Adam, fused (torch)"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with record_function("## EMA (ours)"):
            ema.update(unet)

    step()
    table = profile_table(step, 2)

    def forward_backward(model: torch.nn.Module, call: Callable) -> Callable[[], None]:
        def run() -> None:
            timesteps = torch.randint(0, 1000, (BATCH,), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = add_noise(x0, noise, timesteps, coefficients)
            hybrid_loss(call(x_t, timesteps), x0, x_t, noise, timesteps, coefficients=coefficients)["loss"].backward()
            model.zero_grad(set_to_none=True)
        return run

    anchor = official_style().train()
    ab = paired({
        OFFICIAL_ANCHOR: forward_backward(anchor, lambda x, t: anchor(x, t, labels)),
        "ours": forward_backward(unet, lambda x, t: unet(x, t, class_labels=labels).sample),
    }, max(2, rounds // 2), (OFFICIAL_ANCHOR,))
    for p in unet.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    loop = torch.optim.Adam(unet.parameters(), lr=1e-4, foreach=True)
    adam = paired({"Adam, per-tensor loop (before)": loop.step, "Adam, fused (now)": optimizer.step}, rounds * 2,
                  ("Adam, per-tensor loop (before)",))
    return {"profile": table, "ab_forward_loss_backward": ab, "ab_adam": adam}


def print_part(title: str, part: dict) -> None:
    table = part["profile"]
    print(f"\n{title}: {table['total_ms']:.0f} ms self CPU per step under the profiler")
    print(f"  {'op class':<28}{'ms':>9}{'share':>8}")
    for name, row in table["classes"].items():
        print(f"  {name:<28}{row['ms']:>9.1f}{100 * row['share']:>7.1f}%")
    print(f"  {'region':<44}{'ms':>9}{'share':>8}")
    for name, row in table["regions"].items():
        print(f"  {name:<44}{row['ms']:>9.1f}{100 * row['share']:>7.1f}%")
    for key, rows in part.items():
        if key.startswith("ab_"):
            references = list(next(iter(rows.values()))["speedup_over"])
            print(f"  same-process A/B ({key[3:]}): CPU s, speed-up over " + " | ".join(references) + " (quartiles)")
            for name, row in rows.items():
                cells = "".join(f"  {m:>6.3f}x ({lo:.2f}-{hi:.2f})" for m, lo, hi in row["speedup_over"].values())
                print(f"    {name:<46}{row['median_cpu_s']:>8.3f} s{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="alternation rounds of the A/B comparisons")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    result = {"preset": PRESET, "batch": BATCH, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "pinned_cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
              "rounds": args.rounds, "architectures": architectures(), "sampling_step": sampling(args.rounds), "training_step": training(args.rounds),
              "load_average_1min_after": round(os.getloadavg()[0], 2)}
    print_part("SDAS sampling step (small-64, batch 8)", result["sampling_step"])
    print_part("SDAS training step (small-64, batch 8, 64 px)", result["training_step"])
    from sia.runs import write_json_atomic

    out = Path(__file__).resolve().parent / "out" / "sdas_profile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
