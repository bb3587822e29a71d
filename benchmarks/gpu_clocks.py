"""Each GPU's mean SM clock, power and power-capped share over each timed run: nvidia-smi's samples cut by the
runs' wall-clock spans. The lent cards run GEMMs at their power cap, so two versions that do the same work can run
at different clocks (a rank that waits starts its next kernels faster); this says whether they did.

    nvidia-smi --query-gpu=timestamp,index,power.draw,clocks.sm,clocks_event_reasons.active \\
        --format=csv,noheader,nounits -lms 200 > clocks.csv &      # (run_gpu_pipeline.sh does this)
    python benchmarks/gpu_clocks.py clocks.csv run1.json run2.json [--json out.json]

A run JSON is bench_pipeline.py's (timing.wall_clock_unix: [start, end] of the timed call) or a dict of them (the
stages' merged JSON). Timestamps are read as local time of the machine that took them: run this there, or with
its TZ.
"""

from __future__ import annotations

import argparse
import datetime
import json
from statistics import mean

SW_POWER_CAP = 0x4  # nvmlClocksEventReasonSwPowerCap


def read_samples(path: str) -> list[tuple[float, int, float, float, bool]]:
    """(unix time, GPU index, power W, SM clock MHz, power-capped) per line; lines that are not samples (a header,
    "[N/A]", an error) are skipped."""
    samples = []
    with open(path) as f:
        for line in f:
            fields = [x.strip() for x in line.split(",")]
            if len(fields) != 5:
                continue
            try:
                t = datetime.datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                samples.append((t, int(fields[1]), float(fields[2]), float(fields[3]),
                                bool(int(fields[4], 16) & SW_POWER_CAP)))
            except ValueError:
                continue
    return samples


def read_runs(paths: list[str]) -> dict[str, tuple[float, float]]:
    """{run name: (start, end) unix seconds} of the timed calls in bench_pipeline JSON files."""
    runs = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for name, run in ({path: data} if "timing" in data else data).items():
            span = (run.get("timing") or {}).get("wall_clock_unix")
            if span:
                runs[name] = tuple(span)
    return runs


def per_run(samples, runs) -> dict[str, dict[int, dict]]:
    """{run: {GPU: mean SM MHz, mean W, share of samples power-capped, samples}} over the run's span."""
    out = {}
    for name, (start, end) in runs.items():
        gpus = {}
        for gpu in sorted({s[1] for s in samples}):
            inside = [s for s in samples if s[1] == gpu and start <= s[0] <= end]
            if inside:
                gpus[gpu] = dict(sm_mhz=mean(s[3] for s in inside), power_w=mean(s[2] for s in inside),
                                 power_capped=mean(s[4] for s in inside), samples=len(inside))
        out[name] = gpus
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("clocks", help="nvidia-smi's CSV (timestamp, index, power.draw, clocks.sm, event reasons)")
    p.add_argument("runs", nargs="+", help="bench_pipeline JSON files (or stages' merged JSON)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    table = per_run(read_samples(args.clocks), read_runs(args.runs))
    print(f"{'run':60s} {'GPU':>3s} {'SM MHz':>7s} {'W':>6s} {'capped':>7s} {'samples':>7s}")
    for name, gpus in table.items():
        for gpu, v in gpus.items():
            print(f"{name[-60:]:60s} {gpu:3d} {v['sm_mhz']:7.0f} {v['power_w']:6.1f} {v['power_capped']:7.0%} "
                  f"{v['samples']:7d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
