"""Speed and memory of SDAS sampling (`sia.SDASPipeline` components) on one CPU thread.

Protocol of docs/performance-anchors.md: fp32, random weights, 15 classes (MVTec AD), one thread
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``, pinned with ``taskset -c 0`` when available),
one process per row, peak RSS of that process. A "step" is one UNet forward plus one
`SDASScheduler.step` (anomaly strength 0.15) at batch B, with the UNet input laid out as the
pipeline lays it out (`sia.unets.unet_input`): the unit the official figures use.
Rows and what is timed:

* small-64 (10.7 M params, the official 64 px network): median of 5 timed steps after 1 warm-up step;
* adm-256, batch 1 (554 M params, the official network): 1 warm-up step, median of 2 timed steps;
* adm-256, batch 8: a single timed step, no warm-up (about 2 minutes on an idle core).

Each row's process has a time limit; a row that exceeds it is reported as not measured.

images/s assumes the official 20-step sampler: B / (20 x seconds per step). ``cpu s/step`` is the
process CPU time of a step (one thread): on a shared machine it estimates the idle-core wall time.

    .venv/bin/python benchmarks/sdas.py                      # writes benchmarks/out/sdas.json
    .venv/bin/python benchmarks/sdas.py --presets small-64   # re-measures those rows only

With ``--presets`` the other presets' rows are kept from the existing JSON, each with the time it was
measured (``measured_utc``), so the quick rows can be re-measured without the adm-256 minutes.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROWS = [  # preset, batch, warm-up steps, timed steps, time limit of the row's process (s)
    ("small-64", 1, 1, 5, 300),
    ("small-64", 8, 1, 5, 300),
    ("adm-256", 1, 1, 2, 300),
    ("adm-256", 8, 0, 1, 300),
]
ANCHORS = {("small-64", 1): 0.10, ("small-64", 8): 0.70, ("adm-256", 1): 14.7}
NUM_CLASSES = 15
STEPS_PER_IMAGE = 20


def measure_row(preset: str, batch: int, warmup: int, timed: int) -> dict:
    import torch

    from sia.scheduler import SDASScheduler
    from sia.unets import build_unet, unet_input

    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = build_unet(preset, num_classes=NUM_CLASSES).eval()
    scheduler = SDASScheduler()
    scheduler.set_timesteps(STEPS_PER_IMAGE)
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.arange(batch) % NUM_CLASSES
    strength = torch.full((batch,), 0.15)
    times, cpu_times = [], []
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps[: warmup + timed]):
            start, cpu_start = time.perf_counter(), time.process_time()
            output = unet(unet_input(x, unet.dtype), t, class_labels=labels).sample
            x = scheduler.step(output, t, x, generator=generator, anomaly_strength=strength).prev_sample
            elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
            if i >= warmup:
                times.append(elapsed)
                cpu_times.append(cpu_elapsed)
    seconds = statistics.median(times)
    return {
        "preset": preset, "batch": batch, "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        "warmup_steps": warmup, "timed_steps": timed, "step_times_s": [round(v, 4) for v in times],
        "seconds_per_step": round(seconds, 4), "cpu_seconds_per_step": round(statistics.median(cpu_times), 4), "images_per_s": round(batch / (STEPS_PER_IMAGE * seconds), 4),
        "seconds_per_image_20_steps": round(STEPS_PER_IMAGE * seconds / batch, 2),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _kept_rows(out: Path, presets: set[str]) -> list[dict]:
    """Rows of the other presets from an earlier run, stamped with when they were measured."""
    try:
        old = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    written = datetime.fromtimestamp(out.stat().st_mtime, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [{"measured_utc": written, **row} for row in old.get("rows", []) if row.get("preset") not in presets]


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--row":
        print(json.dumps(measure_row(sys.argv[2], *map(int, sys.argv[3:]))))
        return
    known = list(dict.fromkeys(row[0] for row in ROWS))
    presets = set(known)
    if len(sys.argv) == 3 and sys.argv[1] == "--presets":
        presets = {p.strip() for p in sys.argv[2].split(",") if p.strip()}
        if not presets or presets - set(known):
            sys.exit(f"--presets: expected a comma-separated subset of {', '.join(known)}, got {sys.argv[2]!r}")
    elif len(sys.argv) > 1:
        sys.exit("usage: sdas.py [--presets small-64,adm-256]")
    out = Path(__file__).parent / "out" / "sdas.json"
    kept = _kept_rows(out, presets) if presets != set(known) else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    rows = []
    for preset, batch, warmup, timed, limit in ROWS:
        if preset not in presets:
            rows += [row for row in kept if (row.get("preset"), row.get("batch")) == (preset, batch)]
            continue
        cmd = [*pin, sys.executable, __file__, "--row", preset, str(batch), str(warmup), str(timed)]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=limit)
            row = json.loads(done.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            row = {"preset": preset, "batch": batch, "not_measured": f"exceeded {limit} s (shared machine under load)"}
        row["official_seconds_per_step"] = ANCHORS.get((preset, batch))
        row["measured_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        rows.append(row)
        print(f"measured {preset} batch {batch}: {row}", file=sys.stderr, flush=True)

    header = f"{'preset':<9} {'batch':>5} {'s/step':>8} {'cpu s/step':>10} {'official':>8} {'img/s (20 steps)':>17} {'s/img':>8} {'peak RSS MiB':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "not_measured" in r:
            print(f"{r['preset']:<9} {r['batch']:>5}  not measured: {r['not_measured']}")
            continue
        official = f"{r['official_seconds_per_step']:.2f}" if r["official_seconds_per_step"] else "-"
        print(f"{r['preset']:<9} {r['batch']:>5} {r['seconds_per_step']:>8.3f} {r['cpu_seconds_per_step']:>10.3f} {official:>8} "
              f"{r['images_per_s']:>17.4f} {r['seconds_per_image_20_steps']:>8.2f} {r['peak_rss_mib']:>13.1f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.machine(), "python": platform.python_version(), "threads": 1,
              "pinned": bool(pin), "load_average_at_end": os.getloadavg(), "rows": rows}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
