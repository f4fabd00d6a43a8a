"""Gather every benchmark into one report, `benchmarks/RESULTS.md`, next to the official anchors.

Runs the other benchmark scripts as subprocesses (one thread each, pinned with ``taskset`` where it
exists, CPU-sized flags), or with ``--reuse`` only reads the JSON they already wrote under
``benchmarks/out/``. Benchmarks without a JSON are listed as missing, with the command that makes it.

    python benchmarks/report.py --reuse                 # report from existing JSON files only
    python benchmarks/report.py                         # run the speed benchmarks, then report
    python benchmarks/report.py --only augment,metrics  # run a subset
    python benchmarks/report.py --with-recipe           # also run the real-data accuracy runs (hours)

Anchors are the official RealNet code measured on this machine kind (docs/performance-anchors.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
RESULTS = HERE / "RESULTS.md"


# ------------------------------------------------------------------------------------------------
# helpers


def _fmt(value: Any, spec: str = ".3f", missing: str = "-") -> str:
    if value is None:
        return missing
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _ratio(official: float | None, ours: float | None) -> str:
    if not official or not ours:
        return "-"
    return f"{official / ours:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _load(name: str) -> dict | None:
    path = OUT / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _mtime(name: str) -> str:
    path = OUT / name
    if not path.is_file():
        return "-"
    return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ------------------------------------------------------------------------------------------------
# one renderer per benchmark: JSON -> markdown lines (tolerant: a changed JSON shape degrades to a note)


def render_augment(data: dict) -> list[str]:
    ms = data.get("ms_per_sample", {})
    per_second = data.get("samples_per_s", {})
    official = data.get("official_ms_per_sample", 13.7)
    rows = [[what, _fmt(ms.get(what), ".2f"), _fmt(per_second.get(what), ".0f"),
             f"{official} ms (full sample)" if i < 2 else "-",
             _ratio(official, ms.get(what)) if i < 2 else "-"]
            for i, what in enumerate(ms)]
    lines = [(f"Image {data.get('size')}², batch {data.get('batch')}, {data.get('threads')} thread; "
              f"target <= 2.7 ms per sample (>= {data.get('target_samples_per_s', 365)} samples/s)."), ""]
    return lines + _table(["what", "ms / sample", "samples / s", "official", "speed-up"], rows)


def render_sdas(data: dict) -> list[str]:
    rows = []
    stamps = {r.get("measured_utc") for r in data.get("rows", [])}
    for r in data.get("rows", []):
        if "not_measured" in r:
            row = [r.get("preset"), r.get("batch"), "not measured: " + str(r["not_measured"]),
                   _fmt(r.get("official_seconds_per_step"), ".2f"), "-", "-"]
        else:
            row = [r.get("preset"), r.get("batch"), _fmt(r.get("seconds_per_step"), ".3f"),
                   _fmt(r.get("official_seconds_per_step"), ".2f"),
                   _ratio(r.get("official_seconds_per_step"), r.get("seconds_per_step")),
                   _fmt(r.get("peak_rss_mib"), ".0f")]
        rows.append(row + ([_fmt(r.get("measured_utc"))] if len(stamps) > 1 else []))
    lines = [(f"One UNet forward + one SDASScheduler step, {data.get('threads', 1)} thread, pinned: {data.get('pinned')}; "
              "target: <= official."), ""]
    header = ["UNet", "batch", "s / step", "official s / step", "speed-up", "peak RSS MiB"]
    return lines + _table(header + (["measured"] if len(stamps) > 1 else []), rows)


def render_diffusion_train(data: dict) -> list[str]:
    median = data.get("median", {})
    anchor = data.get("anchor_official", {})
    parts = (("forward + loss", "forward_loss_s"), ("backward + clip", "backward_clip_s"),
             ("Adam + EMA", "optimizer_ema_s"), ("total", "total_s"))
    rows = [[label, _fmt(median.get(key), ".3f"), _fmt(anchor.get(key), ".2f"), _ratio(anchor.get(key), median.get(key))]
            for label, key in parts]
    lines = [(f"{data.get('preset')} UNet ({data.get('params_m')} M params), batch {data.get('batch')}, "
              f"{data.get('image_size')}², {data.get('threads')} thread, median of {data.get('timed_steps')} steps; "
              f"peak RSS {_fmt(data.get('peak_rss_mib'), '.0f')} MiB; target: <= official."), ""]
    return lines + _table(["part", "ours s", "official s", "speed-up"], rows)


def _speedup(row: dict | None, reference: str) -> str:
    cell = (row or {}).get("speedup_over", {}).get(reference)
    return f"{cell[0]:.3f}x ({cell[1]:.2f}-{cell[2]:.2f})" if cell else "-"


def render_sdas_profile(data: dict) -> list[str]:
    sampling, training = data["sampling_step"], data["training_step"]
    shares = [sampling["profile"]["classes"], training["profile"]["classes"]]
    classes = list(dict.fromkeys([*shares[1], *shares[0]]))
    rows = [[name] + [_fmt(100 * part[name]["share"], ".1f") + " %" if name in part else "-" for part in shares]
            for name in classes]
    regions = [sampling["profile"]["regions"], training["profile"]["regions"]]
    ours = [sum(r["share"] for k, r in part.items() if "(ours)" in k) for part in regions]
    rows.append(["**of which our code** (" + ", ".join(k.replace(" (ours)", "") for part in regions for k in part
                                                   if "(ours)" in k) + ")"] + [f"{100 * v:.1f} %" for v in ours])
    lines = [(f"Per op class, self CPU time under torch.profiler, {data.get('preset')} batch {data.get('batch')}, one "
              "thread, random weights (`benchmarks/sdas_profile.py`). Sampling step = UNet forward + "
              "SDASScheduler.step; training step = noise, forward, hybrid loss, backward, clip, Adam, EMA."), ""]
    lines += _table(["op class", "sampling step", "training step"], rows) + [""]
    anchor_name = "official-style ADM, anchors' architecture"
    forward, train, adam = sampling["ab_unet_forward"], training["ab_forward_loss_backward"], training["ab_adam"]
    before, now = "ours, NCHW input (before)", "ours, channels-last input (now)"
    lines += [(f"Same-process A/B, CPU time, variants alternated ABBA over {data.get('rounds')} rounds (the UNet "
               "forward) or half as many (forward+loss+backward); speed-up = median of the per-round time ratios, "
               "quartiles in brackets. \"official-style\" is the independent ADM of `tests/official_adm.py`, "
               "which computes what the official guided-diffusion UNet computes, with the same torch ops."), ""]
    lines += _table(["comparison", "speed-up"], [
        ["sampling forward: channels-last input (now) over NCHW (before)", _speedup(forward.get(now), before)],
        ["sampling forward: ours now over official-style, anchors' architecture", _speedup(forward.get(now), anchor_name)],
        ["training forward+loss+backward: ours over official-style, anchors' architecture",
         _speedup(train.get("ours"), anchor_name)],
        ["Adam step: fused (now) over the per-tensor loop (before)",
         _speedup(adam.get("Adam, fused (now)"), "Adam, per-tensor loop (before)")],
    ]) + [""]
    arch = data.get("architectures", {})
    lines += _table(["network", "params", "attention at (px, plus the middle block)", "head channels"],
                    [[name, f"{a['params']:,}", ", ".join(map(str, a["attention_px"])), a["head_channels"]]
                     for name, a in arch.items()])
    sample_now = (forward.get(now) or {}).get("speedup_over", {}).get(anchor_name, [None])[0]
    train_now = (train.get("ours") or {}).get("speedup_over", {}).get(anchor_name, [None])[0]
    def verdict(value: float | None) -> str:
        return "" if value is None else (" (meets the target)" if value >= 1.0 else " (short of the target)")

    lines += ["", (f"**Against the targets**, with the official-style ADM of the network the anchors were measured on "
                   f"as the same-process yardstick. That network is now the `small-64` preset itself (same layout and "
                   f"parameter count, table above), so the comparison is like for like. The sampling forward runs "
                   f"{_fmt(sample_now, '.2f')}x the yardstick{verdict(sample_now)}, the training "
                   f"forward+loss+backward {_fmt(train_now, '.2f')}x{verdict(train_now)}; target >= 1.0x. Absolute "
                   f"seconds differ by more than 2x between the machines of this kind, so only these same-process "
                   f"ratios compare code with code. At adm-256's widths the "
                   f"channels-last input gains less (1.02x per forward at 64 px and at 128 px, batch 1; the 256 px "
                   f"rows were not re-run).")]
    return lines + [""] + SDAS_PROFILE_NOTES


# The reading of the profile (the numbers it rests on are in the tables above).
SDAS_PROFILE_NOTES = [
    ("**Ours, fixed.** (1) Sampling feeds the UNet a channels-last input on CPU (`sia.unets.unet_input`, used by "
    "`SDASPipeline`, the inpainting pipeline and `benchmarks/sdas.py`); the weights are untouched. The layout "
    "propagates through the network: oneDNN's convolutions stop reordering every activation, and torch's nearest 2x "
    "upsampling stops going through two transposing copies (this torch's NCHW kernel takes about 50 ms for one "
    "8x128x32x32 -> 64x64 upsampling, channels-last about 5 ms). Outputs agree to convolution rounding (about 3e-6). "
    "Training keeps NCHW: there channels-last makes the backward slower (0.95x backward, 0.975x per step). "
    "(2) Training's Adam is torch's fused CPU kernel (`sia.training.make_adam`) instead of the per-tensor loop."),
    "",
    ("**Ours, already cheap.** `SDASScheduler.step`, the hybrid loss with its L_vlb term, q(x_t | x_0) and the EMA "
    "(a foreach lerp) are the \"our code\" row: under 0.5 % of either step. No image-sized tensor is float64 or "
    "cast (the loss's float64 schedule tables are indexed at the batch's timesteps, then cast). Gradient clipping is torch's "
    "`clip_grad_norm_` (about 0.2 %; on CPU its foreach norm is a per-tensor loop inside torch). Attention already "
    "runs in torch's SDPA (diffusers' default processor); the official einsum attention is the slower one."),
    "",
    ("**diffusers' and torch's.** The rest is inside the UNet: convolutions (oneDNN 3x3 forward and backward; the 1x1 "
    "skip convolutions go to torch's `slow_conv2d`), GroupNorm, SiLU, the residual and scale-shift arithmetic. These "
    "are the ops and shapes of the ADM architecture, the same the official code runs: in the same process the "
    "official-style ADM of the same network runs the NCHW sampling forward at our speed and the training "
    "forward+loss+backward about 2 % faster (tables above). diffusers' own extras are small: a division by "
    "`output_scale_factor` (1.0) after every residual and attention block (`aten::div`, under 1 % of the sampling "
    "step) and a few reshapes around SDPA. Removing them means patching diffusers' modules, so they stay."),
    "",
    ("**Architecture.** Both presets are official networks; the official-style ADM's weights map onto them key for "
    "key with equal parameter counts (tests/test_categories_and_unets.py). `adm-256`: 552,829,446 parameters, "
    "attention at 32, 16 and 8 px plus the middle block, 64-channel heads, scale-shift norm, residual up/down blocks, "
    "6 output channels. `small-64`: the network the official code builds for the anchors' 64 px configuration "
    "(width 64, mult 1,2,2,2): it reads the yaml's `attention_resolutions` [32, 16, 8] as downsample factors, so on a "
    "64 px image attention runs only at 8 px (and in the middle block), with 64-channel heads: 10,738,630 parameters, "
    "the anchors' \"10.7 M\". The preset used to add attention at 16 px (five more blocks) with 32-channel heads "
    "(11,070,150 parameters), which cost about 3 % per sampling forward and 6 % per training step in every "
    "comparison with the anchors. Pipelines saved with that layout keep it in their config.json and still load; training runs started with it resume with it."),
]


def render_realnet(data: dict) -> list[str]:
    rows = []
    for r in data.get("rows", []):
        rows.append([r.get("name"), _fmt(r.get("params_m"), ".1f"), _fmt(r.get("median_s"), ".3f"),
                     _fmt(r.get("median_cpu_s"), ".3f"), _fmt(r.get("official_s"), ".2f"),
                     _fmt(r.get("speedup_vs_official_cpu"), ".2f"), _fmt(r.get("peak_rss_mib"), ".0f"),
                     _fmt(r.get("official_rss_mib"), ".0f")])
    lines = [str(data.get("protocol", "")), ""]
    lines += _table(["row", "params M", "wall s", "CPU s", "official s", "speed-up (CPU)", "RSS MiB", "official RSS"],
                    rows)
    ratio = data.get("same_session_speedup_vs_official_style_attention")
    if ratio:
        lines += ["", f"Same-session CPU-time speed-up over the official-style attention (WRN50, batch 1): {ratio:.2f}x."]
    lines += ["", "Target: >= 1.5x faster than official with identical outputs, and less memory."]
    return lines


def render_realnet_deploy(data: dict) -> list[str]:
    rows = [[r.get("name"), r.get("batch"), r.get("mode"), _fmt(r.get("images_per_s"), ".3f"),
             _fmt(r.get("images_per_cpu_s"), ".3f"), _fmt(r.get("peak_rss_mib"), ".0f"),
             _fmt(r.get("speedup_vs_official_wall"), ".2f"), _fmt(r.get("official_rss_mib"), ".0f")]
            for r in data.get("rows", [])]
    lines = [str(data.get("protocol", "")), ""]
    lines += _table(["architecture", "batch", "mode", "img/s", "img/CPU s", "RSS MiB", "x official (wall)",
                     "official RSS"], rows)
    load = data.get("load_average_at_end")
    if load:
        lines += ["", f"Load average when the run ended: {load} (the machine was shared; wall times are noisy)."]
    lines += ["", ("Targets (WRN50 arch A, batch 1, one thread): >= 3x the official images/s through ONNX Runtime or "
                   "OpenVINO, >= 1.5x in eager PyTorch; peak RSS <= 3,326 MiB.")]
    return lines


def render_metrics(data: dict) -> list[str]:
    setup = data.get("setup", {})
    rows = [[r.get("what"), _fmt(r.get("seconds"), ".4f"), _fmt(r.get("cpu_seconds"), ".4f"),
             ", ".join(f"{k} {v:.4f}" for k, v in r["value"].items()) if isinstance(r.get("value"), dict)
             else _fmt(r.get("value"), ".6f", ""), r.get("note", "")]
            for r in data.get("rows", [])]
    lines = [(f"{setup.get('maps')} maps of {setup.get('size')}² ({setup.get('defective')} defective), "
              f"{setup.get('statistic', '')}; official: PRO 44.1 s (1000-threshold loop), anomalib AUPRO 1.13 s, "
              "image + pixel AUROC 0.44 + 0.77 s; targets: PRO <= 0.5 s exact, both AUROCs <= 0.3 s."), ""]
    lines += _table(["what", "wall s", "CPU s", "value", "note"], rows)
    differences = data.get("differences")
    if differences:
        lines += [""] + [f"- {k}: {v:+.2e}" for k, v in differences.items()]
    return lines


ACCURACY_ANCHORS = [
    ["PatchCore (official anchor)", "hazelnut_toy", "1.000", "0.987", "0.923", "4 s"],
    ["PaDiM (official anchor)", "hazelnut_toy", "1.000", "0.988", "0.947", "4 s"],
    ["official RealNet code, 1,160 it (anchor)", "held-out MVTec category", "0.48", "0.82", "0.63", "3,154 s"],
]


def render_recipe(data: dict) -> list[str]:
    sys.path.insert(0, str(HERE))
    from recipe import markdown_tables  # the same tables as benchmarks/out/recipe.md

    lines = [("256², no crop, frozen tf_efficientnet_lite0 with the offline ImageNet weights, DTD anomalies, "
              "batch 8, the LAST model (never chosen on test data); metrics at 256² (PRO to FPR 0.3). "
              "Each run used one thread."), ""]
    lines += markdown_tables(data.get("runs", []))
    lines += ["", "Official code on this machine kind (docs/performance-anchors.md), for reference:", ""]
    lines += _table(["method", "data", "image AUROC", "pixel AUROC", "PRO", "wall time"], ACCURACY_ANCHORS)
    if (HERE / "recipe_curves.png").is_file():
        lines += ["", "Learning curves (test set, for the curve only): ![recipe curves](recipe_curves.png)"]
    return lines


def render_incontext(data: dict) -> list[str]:
    settings = data["settings"]
    lines = [(f"SDAS model: {settings['preset']} at {settings['image_size']}², {settings['train_steps']} updates of batch "
              f"{settings.get('train_batch', '-')} on the normal training images ({data['train_seconds'] / 60:.0f} min); "
              f"{settings['images']} normal images with Perlin x foreground masks, {settings['sampling_steps']}-step "
              f"{settings['sampler']} sampler, denoising strength {settings['denoising_strength']}, one thread; "
              f"whole run {data['total_seconds'] / 60:.0f} min."), "",
             "Alignment: mean |x_out - x_in| inside and outside the mask (in [0, 1] units).", ""]
    lines += _table(["s", "inside", "inside vs s = 0 (same seeds)", "outside", "outside max", "s per set"],
                    [[str(r["strength"]), _fmt(r["inside_mean_abs"], ".4f"), _fmt(r.get("inside_vs_s0"), ".4f"),
                      _fmt(r["outside_mean_abs"], ".4f"), _fmt(r["outside_max_abs"], ".4f"), _fmt(r.get("seconds"), ".0f")]
                     for r in data["alignment"]])
    lines += ["", "Seam energy: mean luma gradient magnitude on the one-pixel ring around each mask edge.", ""]
    lines += _table(["s", "normal image", "in-context", "Eq. 3, opacity 1", "Eq. 3, opacity U(0.5, 1)"],
                    [[str(r["strength"]), _fmt(r["normal_image"], ".4f"), _fmt(r["in_context"], ".4f"),
                      _fmt(r["eq3_opacity_1"], ".4f"), _fmt(r["eq3_opacity_0.5_1"], ".4f")] for r in data["seams"]])
    if data.get("features"):
        lines += ["", "Lite0 ImageNet features (globally pooled last stage; not Inception FID, and a few dozen images "
                      "per set): Fréchet distance (FD) and mean pairwise distance.", ""]
        lines += _table(["source", "FD vs real normal", "FD vs real defective", "mean pairwise"],
                        [[r["source"], _fmt(r["fd_vs_normal"], ".1f"), _fmt(r["fd_vs_defective"], ".1f"),
                          _fmt(r["mean_pairwise"], ".2f")] for r in data["features"]])
    detector = data.get("detector")
    lines += ["", f"Detector comparison: {detector}" if isinstance(detector, str) else "Detector comparison: see the JSON."]
    if data.get("strip"):
        lines += ["", f"![in-context strip]({Path(data['strip']).name})"]
    return lines


def render_anomalib_generators(data: dict) -> list[str]:
    sys.path.insert(0, str(HERE))
    from anomalib_generators import markdown  # the same table as benchmarks/out/anomalib_generators.md

    rows = data.get("rows", [])
    settings = sorted({(r["image_size"], r["steps"], r["batch_size"]) for r in rows})
    lines = [("anomalib's own DRAEM (its Engine, loop, optimiser and defaults) with each anomaly generator; "
              "budget (image size², steps, batch): " + ", ".join(f"{s}², {n} steps, batch {b}" for s, n, b in settings)
              + "; the last model; raw DRAEM maps scored with realnet.metrics (PRO to FPR 0.3); one thread."), ""]
    return lines + markdown(rows).splitlines()


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    script: str
    output: str
    render: Callable[[dict], list[str]]
    run_args: tuple[tuple[str, ...], ...]  # one or more invocations of the script
    heavy: bool = False

    def commands(self, python: str) -> list[list[str]]:
        return [[python, str(HERE / self.script), *args] for args in self.run_args]


BENCHMARKS = [
    Benchmark("augment", "Synthetic-anomaly augmentation (Perlin x foreground x blend)", "augment.py", "augment.json",
              render_augment, (("--repeats", "5"),)),
    Benchmark("metrics", "Metrics: image AUROC, pixel AUROC, PRO", "metrics.py", "metrics.json", render_metrics, ((),)),
    Benchmark("sdas", "SDAS sampling step", "sdas.py", "sdas.json", render_sdas, ((),)),
    Benchmark("diffusion_train", "SDAS diffusion training step", "diffusion_train.py", "diffusion_train.json",
              render_diffusion_train, ((),)),
    Benchmark("sdas_profile", "SDAS steps: where the time goes", "sdas_profile.py", "sdas_profile.json",
              render_sdas_profile, ((),)),
    Benchmark("realnet", "RealNet inference and training step", "realnet_speed.py", "realnet_speed.json", render_realnet,
              (("--quick",),)),
    Benchmark("realnet_deploy", "RealNet deployment: eager, channels-last, ONNX Runtime, OpenVINO", "realnet_speed.py",
              "realnet_deploy_speed.json", render_realnet_deploy, (("--deploy", "--quick"),)),
    Benchmark("recipe", "Real-data accuracy: RealNet recipes vs PatchCore (hazelnut_toy, kolektorsdd)", "recipe.py",
              "recipe.json", render_recipe, ((), ("--report",)), heavy=True),
    Benchmark("incontext", "In-context SDAS vs SDAS + Eq. 3: alignment, seams, Lite0 realism", "incontext.py",
              "incontext.json", render_incontext, (("--features",),), heavy=True),
    Benchmark("anomalib_generators", "anomalib's DRAEM: its stock anomaly generator vs sia's", "anomalib_generators.py",
              "anomalib_generators.json", render_anomalib_generators, ((),), heavy=True),
]


# ------------------------------------------------------------------------------------------------
# machine description


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"arch": platform.machine(), "os": platform.platform()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), None)
        info["logical_cpus_in_machine"] = sum(1 for l in text.splitlines() if l.startswith("processor"))
    except OSError:
        info["cpu"] = platform.processor() or None
    info["usable_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "diffusers", "timm", "accelerate", "numpy", "scipy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


# ------------------------------------------------------------------------------------------------


def run_benchmark(benchmark: Benchmark, log) -> bool:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") and benchmark.name not in ("sdas", "realnet", "realnet_deploy") else []
    for command in benchmark.commands(sys.executable):
        log(f"running {' '.join(command[1:])}")
        started = time.perf_counter()
        done = subprocess.run([*pin, *command], cwd=ROOT, env=env, check=False)
        log(f"  exit {done.returncode} after {time.perf_counter() - started:.0f} s")
        if done.returncode != 0:
            return False
    return True


def build_report(selected: list[Benchmark], ran: dict[str, bool], reuse: bool) -> str:
    info, found = machine(), versions()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmark results", "",
        (f"Generated {now} by `benchmarks/report.py{' --reuse' if reuse else ''}`. Each section is one "
         "benchmark script; its JSON is in `benchmarks/out/`. \"official\" = the official RealNet code measured "
         "on this machine kind with the same protocol (docs/performance-anchors.md); speed-up = official / ours."), "",
        "## Machine and software", "",
        (f"- CPU: {info.get('cpu')} ({info.get('logical_cpus_in_machine')} logical CPUs in the machine, "
         f"{info.get('usable_cores')} of them open to the report process), {info.get('ram_gib')} GiB RAM, {info.get('os')}"),
        (f"- load average when this report was written: {info.get('load_average')} (the machine is shared; "
         "CPU-time columns are the least disturbed figures)"),
        "- " + ", ".join(f"{k} {v}" for k, v in found.items()),
        ("- settings: one thread per benchmark (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`), pinned with "
         "`taskset -c 0` where available, fp32, medians after warm-up"), "",
    ]
    missing = []
    for benchmark in selected:
        data = _load(benchmark.output)
        lines += [f"## {benchmark.title}", ""]
        if data is None:
            missing.append(benchmark)
            why = "its run failed" if ran.get(benchmark.name) is False else "not run yet"
            lines += [f"Missing: no `benchmarks/out/{benchmark.output}` ({why}). Make it with "
                      + " then ".join("`" + " ".join(["python", f"benchmarks/{benchmark.script}", *a]) + "`"
                                      for a in benchmark.run_args) + ".", ""]
            continue
        lines += [f"Source: `benchmarks/out/{benchmark.output}` (written {_mtime(benchmark.output)}).", ""]
        try:
            lines += benchmark.render(data)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            lines += [f"(could not read this JSON's layout: {type(err).__name__}: {err}; see the file)"]
        lines.append("")
    lines += ["## Missing benchmarks", ""]
    if missing:
        lines += [f"- {b.name}: `benchmarks/out/{b.output}` does not exist" for b in missing]
    else:
        lines.append("None: every benchmark has results.")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--reuse", action="store_true", help="run nothing; report from the JSON files that exist")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all); "
                        "known: " + ", ".join(b.name for b in BENCHMARKS))
    parser.add_argument("--with-recipe", action="store_true",
                        help="also run benchmarks/recipe.py (real-data training runs: hours on one core)")
    parser.add_argument("--output", default=str(RESULTS), help="markdown file to write")
    args = parser.parse_args()

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - {b.name for b in BENCHMARKS})
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}")
    selected = [b for b in BENCHMARKS if not names or b.name in names]

    ran: dict[str, bool] = {}
    if not args.reuse:
        for benchmark in selected:
            if benchmark.heavy and not args.with_recipe:
                print(f"skipping {benchmark.name} (pass --with-recipe to run it; its existing JSON is reported)")
                continue
            ran[benchmark.name] = run_benchmark(benchmark, print)

    # The report always covers every benchmark, whichever were run now.
    text = build_report(BENCHMARKS, ran, args.reuse)
    output = Path(args.output)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, output)
    print(text)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
