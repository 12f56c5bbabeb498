#!/usr/bin/env python3
"""Kernel time by kernel from an Nsight Compute log: where a benchmark's GPU time goes.

Record one duration per launch (no replay, clocks and caches as the run leaves them), then sum:

    ncu --csv --page raw --metrics gpu__time_duration.sum --cache-control none --clock-control none \\
        --log-file ncu.csv build/cuda/bench/bench_context --ranks 8 --seq 65536 --layouts zigzag --exchanges ring \\
        --repeat 1
    python3 bench/common/ncu_kernel_times.py ncu.csv

Prints the total, each (kernel, grid) and each kernel name by total time, and the launch sequence in runs of one
kernel name, which shows where one phase of the benchmark ends and the next begins. Nsight Compute serialises
launches, so the sum is the kernel time the launches would take one after another (copies are not kernels and are
not counted).
"""
import collections
import csv
import re
import sys


def main(path):
    try:
        with open(path, errors="replace") as log:
            rows = list(csv.reader(line for line in log if line.startswith('"')))
    except OSError as e:
        sys.exit(f"{path}: cannot read the Nsight Compute log ({e.strerror})")
    if not rows:
        sys.exit(f"{path}: no CSV rows (was ncu run with --csv --page raw?)")
    head = rows[0]
    col = {h: i for i, h in enumerate(head)}
    for needed in ("ID", "Kernel Name", "gpu__time_duration.sum"):
        if needed not in col:
            sys.exit(f"{path}: no column '{needed}' (columns: {', '.join(head[:12])}...)")
    dur, name, grid = col["gpu__time_duration.sum"], col["Kernel Name"], col.get("Grid Size")
    units = rows[1][dur] if len(rows) > 1 and not rows[1][col["ID"]].isdigit() else "?"
    body = [r for r in rows[1:] if r and r[col["ID"]].isdigit()]
    per_grid, sequence = collections.defaultdict(lambda: [0, 0.0]), []
    for r in body:
        short = re.split(r"[(<]", r[name].replace("void ", ""), maxsplit=1)[0].split("::")[-1]
        value = float(r[dur].replace(",", ""))
        entry = per_grid[(short, r[grid] if grid is not None else "")]
        entry[0] += 1
        entry[1] += value
        sequence.append((int(r[col["ID"]]), short, value))
    total = sum(v for _, v in per_grid.values())
    print(f"kernels {len(body)}, total {total:.4g} {units}")
    for (kernel, g), (n, v) in sorted(per_grid.items(), key=lambda kv: -kv[1][1]):
        print(f"{v:12.4g} {units} {100 * v / total:5.1f}%  n {n:5d}  {kernel}  grid {g}")
    by_name = collections.Counter()
    for (kernel, _), (_, v) in per_grid.items():
        by_name[kernel] += v
    print("--- by kernel name")
    for kernel, v in by_name.most_common():
        print(f"{v:12.4g} {units} {100 * v / total:5.1f}%  {kernel}")
    print("--- launch sequence, runs of one kernel name")
    runs = []
    for launch_id, kernel, v in sequence:
        if runs and runs[-1][0] == kernel:
            runs[-1][1] += 1
            runs[-1][2] += v
        else:
            runs.append([kernel, 1, v, launch_id])
    for kernel, n, v, launch_id in runs:
        print(f"id {launch_id:6d} {kernel:40s} x{n:<5d} {v:.4g}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
