"""RealNet inference / training-step speed and peak memory at 256x256 on one CPU thread.

Protocol (docs/performance-anchors.md): fp32, random weights, one thread pinned to one core,
median of the timed runs after a warm-up, peak RSS per row measured in a fresh subprocess.
Rows:
- WRN50-2, AFS 256/512/512/256, RRS 256+256 (official architecture A), batch 1 and 8;
- the same network with the official legacy einsum attention swapped in ("official-style"), run in
  the same session so the speed ratio is not distorted by machine load;
- tf_efficientnet_lite0 (24/40/112/256), batch 1 and 8;
- one training step (forward on anomalous + clean images, CE + feature MSE, backward, Adam) at
  batch 8 for lite0 and WRN50.
With --deploy, the deployment rows instead: WRN50 arch A, resnet18 64/128/256/128 and lite0 at
batch 1 and 8, each in eager fp32, eager channels-last, ONNX Runtime and OpenVINO fp32 (the graphs
written by `realnet export`, dynamic batch, parity check skipped: the test suite proves it). The
runtime rows never import torch, so their peak RSS is that of a deployed model.
WRN50 batch-8 rows are slow on one core, so they use fewer timed repeats (printed in the table).
Both wall time and process CPU time are reported: on a shared machine, CPU time of the
single-threaded process is the figure least distorted by other processes on the same core.

The deployment rows include OpenVINO int8 (NNCF post-training quantisation, `realnet export
--precision int8`) and, for WRN50, the same-run official-style eager row as the yardstick. With
--int8-accuracy MODEL, the accuracy cost of int8 instead: a trained model exported as OpenVINO fp32
and int8 (calibrated on its training images), both scored on --data's test split.

Usage: python benchmarks/realnet_speed.py [--cpu 0] [--quick] [--deploy [--threads N]]
       python benchmarks/realnet_speed.py --deploy --threads 2 --backbones wide_resnet50_2 --modes infer,infer-legacy,onnx
       python benchmarks/realnet_speed.py --int8-accuracy runs/hazelnut/model --data DATA --dataset folder
Writes benchmarks/out/realnet_speed.json (--deploy: realnet_deploy_speed.json, or with other
--threads / a subset of --backbones or --modes realnet_deploy_speed__<threads>__<subset>.json;
--int8-accuracy: realnet_int8_accuracy.json). The deploy JSON records the CPU model and its
AVX-512 / VNNI / AMX extensions, which decide how much int8 gains.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

OFFICIAL = {  # docs/performance-anchors.md, official code on this machine kind
    ("wide_resnet50_2", "infer", 1): 1.97,
    ("wide_resnet50_2", "infer", 8): 12.8,
}
OFFICIAL_RSS_MIB = {("wide_resnet50_2", "infer", 1): 3326, ("wide_resnet50_2", "infer", 8): 4384}

ROWS = [
    # (name, backbone, mode, batch, warmup, repeats)
    ("wrn50 b1", "wide_resnet50_2", "infer", 1, 1, 5),
    ("wrn50 b1 official-style attention", "wide_resnet50_2", "infer-legacy", 1, 1, 5),
    ("wrn50 b8", "wide_resnet50_2", "infer", 8, 1, 2),
    ("lite0 b1", "tf_efficientnet_lite0", "infer", 1, 2, 10),
    ("lite0 b8", "tf_efficientnet_lite0", "infer", 8, 1, 5),
    ("lite0 train step b8", "tf_efficientnet_lite0", "train", 8, 1, 3),
    ("wrn50 train step b8", "wide_resnet50_2", "train", 8, 1, 1),
]


def legacy_attention_forward(self, x):
    """The official QKVAttentionLegacy computation (einsum, explicit softmax), for the baseline row."""
    import torch

    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h * w)
    qkv = self.qkv(self.norm(tokens))
    width = c // self.heads
    q, k, v = qkv.reshape(b * self.heads, 3 * width, h * w).split(width, dim=1)
    scale = 1 / math.sqrt(math.sqrt(width))
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
    attended = torch.einsum("bts,bcs->bct", weights, v).reshape(b, c, h * w)
    return (tokens + self.proj_out(attended)).reshape(b, c, h, w)


ARCHITECTURES = {  # benchmark name -> RealNet keyword arguments
    "wide_resnet50_2": {},
    "resnet18": {"afs_channels": [64, 128, 256, 128]},
    "tf_efficientnet_lite0": {},
}
DEPLOY_MODES = ("infer", "infer-channels-last", "infer-legacy", "onnx", "openvino", "openvino-int8",
                "openvino-int8-discriminator")
LEGACY_BACKBONES = ("wide_resnet50_2",)  # the same-run official-style yardstick is for the official architecture


def benchmark_model(backbone: str):
    """Random-weight RealNet with non-zero reconstruction outputs, as a trained model."""
    import torch

    from realnet.model import RealNet

    torch.manual_seed(0)
    model = RealNet(backbone=backbone, backbone_pretrained=False, **ARCHITECTURES.get(backbone, {}))
    for unet in model.recon.unets:
        torch.nn.init.normal_(unet.out[-1].weight, std=1e-3)
    return model.eval()


def export_for_benchmark(backbone: str, fmt: str, folder: Path) -> None:
    """Child process: export the benchmark model (dynamic batch) with `realnet export`'s code."""
    import torch

    from realnet.export import export_model

    torch.set_num_threads(1)
    if fmt.startswith("openvino-int8"):  # speed does not depend on what calibrates it: smooth random images
        import numpy as np

        ys, xs = np.meshgrid(np.linspace(0, 1, 256), np.linspace(0, 1, 256), indexing="ij")
        rng = np.random.default_rng(0)
        calibration = np.stack([np.stack([ys * a, xs * b, (ys + xs) / 2]) for a, b in rng.uniform(0.3, 1, (16, 2))])
        export_model(benchmark_model(backbone), folder, format="openvino", image_size=256, verify=False, overwrite=True,
                     precision=fmt.removeprefix("openvino-"), calibration_images=calibration.astype(np.float32))
        return
    export_model(benchmark_model(backbone), folder, format=fmt, image_size=256, verify=False, overwrite=True)


def run_deployed_row(folder: Path, batch: int, warmup: int, repeats: int, threads: int) -> dict:
    """Child process: time an export with its runtime; torch is never imported."""
    import numpy as np

    from realnet.deploy import ExportedRealNet

    deployed = ExportedRealNet(folder, num_threads=threads)
    images = np.random.default_rng(0).random((batch, 3, 256, 256), dtype=np.float32)
    times, cpu_times = [], []
    for step in range(warmup + repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        deployed(images)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    assert "torch" not in sys.modules
    return {
        "params_m": None,
        "times_s": times,
        "median_s": statistics.median(times),
        "cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_row(backbone: str, mode: str, batch: int, warmup: int, repeats: int, threads: int = 1) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from realnet.recon import AttentionBlock

    if mode == "infer-legacy":
        AttentionBlock.forward = legacy_attention_forward
    model = benchmark_model(backbone)
    images = torch.rand(batch, 3, 256, 256)
    if mode == "infer-channels-last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    times, cpu_times = [], []
    if mode == "train":
        model.train()
        clean = torch.rand(batch, 3, 256, 256)
        masks = (torch.rand(batch, 256, 256) > 0.9).long()
        optimiser = torch.optim.Adam(model.trainable_parameters(), lr=1e-4)
        for step in range(warmup + repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            out = model(images, clean_images=clean)
            loss = torch.nn.functional.cross_entropy(out.logits, masks) + sum(
                torch.nn.functional.mse_loss(r, c) for r, c in zip(out.reconstructions, out.clean_features)
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if step >= warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    else:
        model.eval()
        with torch.inference_mode():
            for step in range(warmup + repeats):
                start, cpu_start = time.perf_counter(), time.process_time()
                model(images)
                if step >= warmup:
                    times.append(time.perf_counter() - start)
                    cpu_times.append(time.process_time() - cpu_start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "params_m": params / 1e6,
        "times_s": times,
        "median_s": statistics.median(times),
        "cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times),
        "peak_rss_mib": peak_mib,
    }


def cpu_model() -> dict:
    """CPU model name and the vector/matrix extensions that decide int8 and fp32 speed (Linux only)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or platform.machine(), "extensions": []}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {"model": model, "extensions": [f for f in wanted if f in flags]}


def write_results(data: dict, name: str) -> None:
    """benchmarks/out/NAME, written atomically."""
    path = Path(__file__).resolve().parent / "out" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", type=int, default=0, help="core to pin each row to (taskset protocol)")
    parser.add_argument("--quick", action="store_true", help="skip the WRN50 batch-8 and WRN50 training rows")
    parser.add_argument("--deploy", action="store_true", help="the deployment rows: eager, channels-last, ONNX Runtime, OpenVINO")
    parser.add_argument("--threads", type=int, default=1, help="threads per row for --deploy (1: pinned to --cpu)")
    parser.add_argument("--backbones", help="--deploy: comma-separated backbones to run (default: all of "
                        "tf_efficientnet_lite0, resnet18, wide_resnet50_2)")
    parser.add_argument("--batches", help="--deploy: comma-separated batch sizes to run (default: 1,8)")
    parser.add_argument("--modes", help=f"--deploy: comma-separated modes to run (default: all of {', '.join(DEPLOY_MODES)})")
    parser.add_argument("--int8-accuracy", metavar="MODEL", help="accuracy of a trained model as OpenVINO fp32 vs int8 on --data")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "hazelnut_toy"),
                        help="data set for --int8-accuracy (default: the shared hazelnut_toy)")
    parser.add_argument("--dataset", default="folder", help="layout of --data (realnet.data)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--export-row", help=argparse.SUPPRESS)
    parser.add_argument("--deployed-row", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.row:  # child process: one row, result as JSON on the last stdout line
        backbone, mode, batch, warmup, repeats, *threads = args.row.split(",")
        print(json.dumps(run_row(backbone, mode, int(batch), int(warmup), int(repeats), int(threads[0]) if threads else 1)))
        return
    if args.export_row:
        backbone, fmt, folder = args.export_row.split(",", 2)
        export_for_benchmark(backbone, fmt, Path(folder))
        return
    if args.deployed_row:
        folder, batch, warmup, repeats, threads = args.deployed_row.rsplit(",", 4)
        print(json.dumps(run_deployed_row(Path(folder), int(batch), int(warmup), int(repeats), int(threads))))
        return
    if args.int8_accuracy:
        int8_accuracy_main(args)
        return
    if args.deploy:
        deploy_main(args)
        return

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    results = []
    for name, backbone, mode, batch, warmup, repeats in ROWS:
        if args.quick and backbone == "wide_resnet50_2" and (batch == 8):
            continue
        command = [sys.executable, __file__, "--row", f"{backbone},{mode},{batch},{warmup},{repeats}"]
        if hasattr(os, "sched_setaffinity"):
            command = ["taskset", "-c", str(args.cpu), *command]
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            print(f"{name}: failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        official = OFFICIAL.get((backbone, mode, batch))
        row.update(
            name=name, backbone=backbone, mode=mode, batch=batch, repeats=repeats,
            images_per_s=batch / row["median_s"], images_per_cpu_s=batch / row["median_cpu_s"],
            wall_s=time.perf_counter() - started, official_s=official,
            speedup_vs_official_wall=(official / row["median_s"]) if official else None,
            speedup_vs_official_cpu=(official / row["median_cpu_s"]) if official else None,
            official_rss_mib=OFFICIAL_RSS_MIB.get((backbone, mode, batch)),
        )
        results.append(row)
        print(f"  done {name}: {row['median_s']:.3f} s ({time.perf_counter() - started:.0f} s wall)", file=sys.stderr)

    legacy = next((r for r in results if r["mode"] == "infer-legacy"), None)
    ours = next((r for r in results if r["backbone"] == "wide_resnet50_2" and r["mode"] == "infer" and r["batch"] == 1), None)
    same_session_ratio = legacy["median_cpu_s"] / ours["median_cpu_s"] if legacy and ours else None

    header = (
        f"{'row':36} {'params M':>8} {'wall s':>8} {'CPU s':>8} {'img/CPU s':>9} {'reps':>4} {'RSS MiB':>8}"
        f" {'official s':>10} {'x off. wall':>11} {'x off. CPU':>10}"
    )
    print(header)
    print("-" * len(header))

    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    for r in results:
        print(
            f"{r['name']:36} {r['params_m']:8.1f} {r['median_s']:8.3f} {r['median_cpu_s']:8.3f}"
            f" {r['images_per_cpu_s']:9.3f} {r['repeats']:4d} {r['peak_rss_mib']:8.0f}"
            f" {fmt(r['official_s'], '.2f'):>10} {fmt(r['speedup_vs_official_wall'], '.2f'):>11}"
            f" {fmt(r['speedup_vs_official_cpu'], '.2f'):>10}"
        )
    if same_session_ratio:
        print(f"same-session CPU-time speed-up over the official-style attention (WRN50 b1): {same_session_ratio:.2f}x")
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    out = {
        "protocol": "fp32, random weights, torch.set_num_threads(1), taskset one core, median after warm-up, "
        "peak RSS (ru_maxrss) of one subprocess per row, 256x256 input",
        "cpu": args.cpu,
        "load_average_1min_at_end": load,
        "same_session_speedup_vs_official_style_attention": same_session_ratio,
        "rows": results,
    }
    write_results(out, "realnet_speed.json")


DEPLOY_ROWS = [
    # (name, backbone, batch, warmup, repeats); small models first, so an interrupted run has them
    ("lite0", "tf_efficientnet_lite0", 1, 1, 5),
    ("lite0", "tf_efficientnet_lite0", 8, 1, 2),
    ("resnet18 64/128/256/128", "resnet18", 1, 1, 5),
    ("resnet18 64/128/256/128", "resnet18", 8, 1, 2),
    ("wrn50 arch A", "wide_resnet50_2", 1, 1, 3),
    ("wrn50 arch A", "wide_resnet50_2", 8, 1, 1),  # one warm-up: OpenVINO repacks its weights at the first inference
]
MODE_NAMES = {"infer": "eager fp32", "infer-channels-last": "eager channels-last",
              "infer-legacy": "eager official-style", "onnx": "ONNX Runtime", "openvino": "OpenVINO fp32",
              "openvino-int8": "OpenVINO int8", "openvino-int8-discriminator": "OpenVINO int8 + discriminator"}
EXPORTED_MODES = ("onnx", "openvino", "openvino-int8", "openvino-int8-discriminator")


def int8_accuracy_main(args) -> None:
    """Accuracy of a trained model exported as OpenVINO fp32 and int8 (calibrated on its training images)."""
    import numpy as np
    import torch

    from realnet.data import load_split
    from realnet.deploy import ExportedRealNet
    from realnet.export import export_model
    from realnet.metrics import evaluate_maps

    torch.set_num_threads(args.threads)
    exports = Path(__file__).resolve().parent / "out" / "exports"
    rows = []
    size = None
    for precision in ("fp32", "int8", "int8-discriminator"):
        folder = exports / f"accuracy-{precision}"
        calibration = None
        if precision != "fp32":
            train = load_split(args.data, dataset=args.dataset, split="train", image_size=size)
            calibration = np.stack([train[i]["image"].numpy() for i in range(min(len(train), 300))])
        started = time.perf_counter()
        export_model(args.int8_accuracy, folder, format="openvino", overwrite=True, precision=precision,
                     calibration_images=calibration, verify=precision == "fp32")
        export_s = time.perf_counter() - started
        deployed = ExportedRealNet(folder, num_threads=args.threads)
        size = tuple(deployed.image_size)
        test = load_split(args.data, dataset=args.dataset, split="test", image_size=size)
        items = [test[i] for i in range(len(test))]
        images = np.stack([x["image"].numpy() for x in items])
        started = time.perf_counter()
        out = deployed(images)
        infer_s = time.perf_counter() - started
        masks = np.stack([x["mask"][0].numpy() for x in items])
        labels = np.array([x["label"] for x in items])
        metrics = evaluate_maps(out.anomaly_map[:, 0], masks, out.image_score, labels)
        rows.append({"precision": precision, "export_s": round(export_s, 1), "images": len(items),
                     "seconds_per_image": infer_s / len(items), **{k: float(v) for k, v in metrics.items()}})
        shutil.rmtree(folder, ignore_errors=True)
    for row in rows[1:]:
        for key in ("image_auroc", "pixel_auroc", "pro"):
            row[f"{key}_change"] = row[key] - rows[0][key]
    print(f"{'precision':9} {'image AUROC':>11} {'pixel AUROC':>11} {'PRO':>7} {'s/img':>7}")
    for r in rows:
        print(f"{r['precision']:9} {r['image_auroc']:11.4f} {r['pixel_auroc']:11.4f} {r['pro']:7.4f} {r['seconds_per_image']:7.3f}")
    write_results({"model": str(args.int8_accuracy), "data": str(args.data), "dataset": args.dataset,
                   "threads": args.threads, "image_size": list(size), "rows": rows}, "realnet_int8_accuracy.json")


def deploy_output_name(threads: int, backbones: list[str] | None, modes: list[str] | None,
                       batches: list[str] | None = None) -> str:
    """``realnet_deploy_speed.json`` for the full one-thread run; other thread counts and subsets get
    their own file (``realnet_deploy_speed__2threads__wide_resnet50_2.json``) so no run overwrites another."""
    parts = [] if threads == 1 else [f"{threads}threads"]
    parts += sorted(backbones or []) + sorted(modes or []) + [f"b{b}" for b in sorted(batches or [])]
    return "realnet_deploy_speed" + "".join(f"__{p}" for p in parts) + ".json"


def _subset(text: str | None, known: tuple[str, ...], flag: str) -> list[str] | None:
    if not text:
        return None
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in known]
    if unknown or not chosen:
        raise SystemExit(f"{flag} {text!r}: expected a comma-separated subset of {', '.join(known)}")
    return chosen


def deploy_main(args) -> None:
    """Export each architecture once per runtime, then time every (architecture, batch, mode) row."""
    threads = args.threads
    all_backbones = tuple(dict.fromkeys(b for _, b, *_ in DEPLOY_ROWS))
    backbones = _subset(args.backbones, all_backbones, "--backbones")
    modes = _subset(args.modes, DEPLOY_MODES, "--modes")
    batches = _subset(args.batches, tuple(dict.fromkeys(str(r[2]) for r in DEPLOY_ROWS)), "--batches")
    output_name = deploy_output_name(threads, backbones, modes, batches)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    pin = ["taskset", "-c", str(args.cpu)] if threads == 1 and hasattr(os, "sched_setaffinity") else []
    exports = Path(__file__).resolve().parent / "out" / "exports"
    results = []

    def child(flag: str, value: str) -> subprocess.CompletedProcess:
        return subprocess.run([*pin, sys.executable, __file__, flag, value], capture_output=True, text=True,
                              env=env, check=False)

    for backbone in backbones or all_backbones:
        rows = [r for r in DEPLOY_ROWS if r[1] == backbone and not (args.quick and backbone == "wide_resnet50_2" and r[2] == 8)
                and (batches is None or str(r[2]) in batches)]
        for mode in modes or DEPLOY_MODES:
            if mode == "infer-legacy" and backbone not in LEGACY_BACKBONES:
                continue
            folder = exports / f"{backbone}-{mode}"
            if mode in EXPORTED_MODES:
                started = time.perf_counter()
                proc = child("--export-row", f"{backbone},{mode},{folder}")
                if proc.returncode != 0:
                    print(f"export {backbone} {mode}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                print(f"  exported {backbone} {mode} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
            for name, _, batch, warmup, repeats in rows:
                started = time.perf_counter()
                if mode in EXPORTED_MODES:
                    proc = child("--deployed-row", f"{folder},{batch},{warmup},{repeats},{threads}")
                else:
                    proc = child("--row", f"{backbone},{mode},{batch},{warmup},{repeats},{threads}")
                if proc.returncode != 0:
                    print(f"{name} {mode} b{batch}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                official = OFFICIAL.get((backbone, "infer", batch))
                row.update(name=name, backbone=backbone, mode=MODE_NAMES[mode], batch=batch, threads=threads,
                           repeats=repeats, images_per_s=batch / row["median_s"],
                           images_per_cpu_s=batch / row["median_cpu_s"], official_s=official,
                           speedup_vs_official_wall=official / row["median_s"] if official else None,
                           official_rss_mib=OFFICIAL_RSS_MIB.get((backbone, "infer", batch)))
                results.append(row)
                write_results({"partial": True, "threads": threads, "rows": results}, output_name)
                print(f"  done {name} b{batch} {mode}: {row['median_s']:.3f} s ({time.perf_counter() - started:.0f} s wall)",
                      file=sys.stderr)
            if mode in EXPORTED_MODES:
                shutil.rmtree(folder, ignore_errors=True)  # graphs of WRN50 are GBs: never keep them
    header = f"{'architecture':26} {'batch':>5} {'mode':20} {'img/s':>7} {'img/CPU s':>9} {'RSS MiB':>8} {'x official':>10}"
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = r["speedup_vs_official_wall"]
        print(f"{r['name']:26} {r['batch']:5d} {r['mode']:20} {r['images_per_s']:7.3f} {r['images_per_cpu_s']:9.3f}"
              f" {r['peak_rss_mib']:8.0f} {format(ratio, '.2f') if ratio else '-':>10}")
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    out = {
        "protocol": f"fp32, random weights, {threads} thread(s){' pinned with taskset' if pin else ''}, 256x256 input, "
        "median after warm-up, peak RSS (ru_maxrss) of one subprocess per row; runtime rows load only the export "
        "(no torch); exports: realnet export, dynamic batch, opset 17",
        "threads": threads,
        "load_average_at_end": load,
        "cpu": cpu_model(),
        "rows": results,
    }
    write_results(out, output_name)


if __name__ == "__main__":
    main()
