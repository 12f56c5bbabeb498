#!/usr/bin/env python3
"""Draw training-loss curves from JSONL metrics files (one JSON object per line) into a PNG.

Each file is one run: its `loss` values are drawn as a line and its `val_loss` values (present on the lines where
validation ran) as markers joined by a dashed line, against `step` (or `tokens`). Needs matplotlib
(pip install matplotlib, or Debian's python3-matplotlib).

    python3 scripts/plot_metrics.py run/metrics.jsonl -o loss.png
    python3 scripts/plot_metrics.py a.jsonl b.jsonl --x tokens --log-y --smooth 0.9 --title "60M, lr sweep"
"""
import argparse
import json
import math
import os
import sys


def fail(message):
    print(f"plot_metrics: error: {message}", file=sys.stderr)
    sys.exit(1)


def read_metrics(path, x_key):
    """The (x, loss) and (x, val_loss) points of one JSONL file; exits with a message naming the file and line."""
    if not os.path.isfile(path):
        fail(f"'{path}': no such file")
    loss, val = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                fail(f"'{path}' line {number}: not valid JSON ({e.msg} at column {e.colno})")
            if not isinstance(row, dict):
                fail(f"'{path}' line {number}: expected a JSON object, got {type(row).__name__}")
            x = row.get(x_key)
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                fail(f"'{path}' line {number}: missing numeric field '{x_key}'")
            for key, points in (("loss", loss), ("val_loss", val)):
                v = row.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    points.append((x, float(v)))
    if not loss and not val:
        fail(f"'{path}': no line has a 'loss' or 'val_loss' value")
    return loss, val


def smooth(values, factor):
    """Exponential moving average with bias correction (factor 0: unchanged)."""
    if factor <= 0:
        return values
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = factor * avg + (1 - factor) * v
        out.append(avg / (1 - factor**i))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Draw loss (and val_loss) curves from JSONL metrics files into a PNG.")
    parser.add_argument("files", nargs="+", metavar="FILE.jsonl", help="metrics files, one run each")
    parser.add_argument("-o", "--output", default="loss.png", help="PNG to write (default: loss.png)")
    parser.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis (default: step)")
    parser.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="exponential smoothing of the training loss, 0 <= s < 1 (default: 0, none)")
    parser.add_argument("--title", default=None, help="plot title (default: none)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated legend labels, one per file (default: the file names)")
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        parser.error(f"--smooth {args.smooth}: expected 0 <= s < 1")
    labels = args.labels.split(",") if args.labels else [os.path.basename(f) for f in args.files]
    if len(labels) != len(args.files):
        parser.error(f"--labels has {len(labels)} labels for {len(args.files)} files")

    runs = [read_metrics(path, args.x) for path in args.files]
    try:
        import matplotlib
    except ImportError:
        fail("matplotlib is not installed: pip install matplotlib (or apt-get install python3-matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for (loss, val), label in zip(runs, labels):
        color = None
        if loss:
            xs, ys = zip(*loss)
            (line,) = ax.plot(xs, smooth(list(ys), args.smooth), label=f"{label} train", linewidth=1.2)
            color = line.get_color()
        if val:
            xs, ys = zip(*val)
            ax.plot(xs, ys, "o--", color=color, markersize=3, linewidth=1, label=f"{label} val")
    ax.set_xlabel(args.x)
    ax.set_ylabel("loss")
    if args.log_y:
        ax.set_yscale("log")
    if args.title:
        ax.set_title(args.title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(args.output)
    print(f"plot_metrics: wrote {args.output} ({len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
