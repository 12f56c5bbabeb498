#!/usr/bin/env python3
"""PyTorch reference for bench_ssm --scan: the same forward scan h_t = a_t * h_{t-1} + x_t on the same shapes.

Reads the JSON bench_ssm wrote (its "scans" entry gives the shape and our forward time, measured on this device
in the same run), times PyTorch implementations of the scan on bf16 inputs with an fp32 state and a bf16 output,
as ours, and writes the JSON back with a "torch_forward_scan" entry: each implementation's time and our speed-up
over it. Implementations:

  chunked-eager     a two-level chunked scan (64-token chunks walked in a loop, vectorised over batch, chunks and
                    channels; the chunks' carries scanned the same way, recursively), in eager mode
  chunked-compile   the same function under torch.compile
  associative-scan  torch's associative_scan higher-order op (log-depth, combine (A, X) pairs) under
                    torch.compile, where this PyTorch provides it

    python3 bench/ssm/torch_scan.py --ours ssm.json [--out merged.json]
"""
import argparse
import json
import sys

CHUNK = 64


def chunked_scan(torch, a, x):
    """h for a, x of shape [batch, T, N] (fp32)."""
    batch, T, N = a.shape
    if T <= CHUNK:
        state = torch.zeros_like(x[:, 0])
        out = []
        for t in range(T):
            state = a[:, t] * state + x[:, t]
            out.append(state)
        return torch.stack(out, dim=1)
    pad = (-T) % CHUNK
    if pad:
        a = torch.cat([a, a.new_ones(batch, pad, N)], dim=1)
        x = torch.cat([x, x.new_zeros(batch, pad, N)], dim=1)
    chunks = a.shape[1] // CHUNK
    a4, x4 = a.view(batch, chunks, CHUNK, N), x.view(batch, chunks, CHUNK, N)
    state = torch.zeros_like(x4[:, :, 0])
    prod = torch.ones_like(a4[:, :, 0])
    local, prods = [], []
    for i in range(CHUNK):  # every chunk from zero, and the running product of a within it
        state = a4[:, :, i] * state + x4[:, :, i]
        prod = prod * a4[:, :, i]
        local.append(state)
        prods.append(prod)
    local, prods = torch.stack(local, dim=2), torch.stack(prods, dim=2)
    leaving = chunked_scan(torch, prods[:, :, -1], local[:, :, -1])  # the state leaving each chunk
    entering = torch.cat([torch.zeros_like(leaving[:, :1]), leaving[:, :-1]], dim=1)
    h = local + prods * entering[:, :, None, :]
    return h.view(batch, chunks * CHUNK, N)[:, :T]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", required=True, help="JSON written by bench_ssm --scan (read, and updated)")
    parser.add_argument("--out", help="where to write the merged JSON (default: --ours itself)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per implementation")
    args = parser.parse_args()

    import torch

    with open(args.ours) as f:
        doc = json.load(f)
    if "scans" not in doc or "forward_ms" not in doc["scans"]:
        sys.exit(f"{args.ours}: no scans.forward_ms (run bench_ssm with --scan)")
    scans = doc["scans"]
    batch, T, N = scans["batch"], scans["seq"], scans["state"]
    dev = torch.device("cuda")
    a = torch.full((batch, T, N), 0.9, dtype=torch.bfloat16, device=dev)
    x = torch.randn(batch, T, N, device=dev).to(torch.bfloat16)

    def chunked(a, x):
        return chunked_scan(torch, a.float(), x.float()).to(torch.bfloat16)

    impls = {"chunked-eager": chunked, "chunked-compile": torch.compile(chunked)}
    try:
        from torch._higher_order_ops.associative_scan import associative_scan

        def combine(left, right):
            return right[0] * left[0], right[0] * left[1] + right[1]

        def assoc(a, x):
            return associative_scan(combine, (a.float(), x.float()), dim=1, combine_mode="pointwise")[1].to(
                torch.bfloat16)

        impls["associative-scan"] = torch.compile(assoc)
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        print(f"associative_scan unavailable: {e}")

    reference = chunked(a, x).float()
    results = {}
    for name, fn in impls.items():
        try:
            for _ in range(2):
                out = fn(a, x)
            torch.cuda.synchronize()
            err = ((out.float() - reference).norm() / reference.norm()).item()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                fn(a, x)
            stop.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(stop) / args.iters
            results[name] = {"ms": ms, "ours_speedup": ms / scans["forward_ms"], "rel_error_vs_chunked_eager": err}
            print(f"{name}: {ms:.3f} ms (ours {scans['forward_ms']:.3f} ms: {ms / scans['forward_ms']:.1f}x faster)")
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            results[name] = {"error": str(e).splitlines()[0][:300]}
            print(f"{name}: failed: {results[name]['error']}")
    doc["torch_forward_scan"] = {"torch": torch.__version__, "implementations": results}
    with open(args.out or args.ours, "w") as f:
        json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
