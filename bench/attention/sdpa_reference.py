#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention on the shapes of bench_attention: every SDPA backend this PyTorch has
(flash, cuDNN, memory-efficient), forward and backward, timed like bench_attention (median of per-call CUDA event
times after warm-up), with the same FLOP counts (forward 4 B Hq S^2 hd, halved when causal; backward 2.5x the
forward).

PyTorch's layout is [B, H, S, hd]; grouped-query heads go in with enable_gqa=True, and where a backend refuses
that, K and V are expanded to Hq heads before the timing (the row says so). With --ours FILE (bench_attention's
JSON from the same run) each row also gets ours / the fastest backend, forward and backward.

    python3 bench/attention/sdpa_reference.py --out sdpa.json --ours attention.json
    python3 bench/attention/sdpa_reference.py --configs "8,2048,32,8,64" --no-causal
"""
import argparse
import json
import os
import statistics
import sys
import time

DEFAULT_CONFIGS = "8,2048,32,8,64;16,1024,12,4,64;8,1024,32,8,128;4,2048,32,8,128;2,8192,16,8,128"


def parse_configs(text):
    out = []
    for item in (c for c in text.split(";") if c):
        try:
            b, s, hq, hkv, hd = (int(x) for x in item.split(","))
        except ValueError:
            sys.exit(f"sdpa_reference: --configs: cannot read '{item}' (expected B,S,Hq,Hkv,hd)")
        if min(b, s, hq, hkv, hd) <= 0 or hq % hkv != 0:
            sys.exit(f"sdpa_reference: --configs: '{item}' needs positive sizes and Hq a multiple of Hkv")
        out.append((b, s, hq, hkv, hd))
    return out


def time_calls(torch, fn, reps, warmup):
    """Median of per-call CUDA event times, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def measure(torch, backend, cfg, causal, reps, warmup):
    F = torch.nn.functional
    from torch.nn.attention import sdpa_kernel
    b, s, hq, hkv, hd = cfg
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, hq, s, hd, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, hkv, s, hd, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, hkv, s, hd, device=dev, dtype=dt, requires_grad=True)
    dout = torch.randn(b, hq, s, hd, device=dev, dtype=dt)
    expanded = False

    def forward(kk, vv, gqa):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa)

    kk, vv, gqa = k, v, hq != hkv
    try:
        forward(kk, vv, gqa)
    except RuntimeError:
        if not gqa:
            raise
        # The backend does not take grouped-query heads: expand K and V once, outside the timing.
        kk = k.detach().repeat_interleave(hq // hkv, dim=1).requires_grad_(True)
        vv = v.detach().repeat_interleave(hq // hkv, dim=1).requires_grad_(True)
        gqa, expanded = False, True
        forward(kk, vv, gqa)
    with torch.no_grad():
        fwd_ms = time_calls(torch, lambda: forward(kk, vv, gqa), reps, warmup)
    out = forward(kk, vv, gqa)

    def backward():
        torch.autograd.grad(out, (q, kk, vv), dout, retain_graph=True)

    bwd_ms = time_calls(torch, backward, reps, warmup)
    return fwd_ms, bwd_ms, expanded


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="';'-separated B,S,Hq,Hkv,hd (bench_attention's)")
    parser.add_argument("--no-causal", action="store_true", help="full (unmasked) attention instead of causal")
    parser.add_argument("--backends", default="flash,cudnn,efficient", help="comma-separated SDPA backends to time")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per pass and backend")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    parser.add_argument("--ours", help="bench_attention's JSON of the same run: adds ours / fastest backend")
    parser.add_argument("--out", help="write the results as JSON here (temporary file + rename)")
    parser.add_argument("--commit", default="unknown", help="the subspace commit measured alongside")
    args = parser.parse_args()
    if args.reps < 1 or args.warmup < 1:
        sys.exit("sdpa_reference: --reps and --warmup must be >= 1")
    configs = parse_configs(args.configs)
    names = [n for n in args.backends.split(",") if n]
    import torch
    from torch.nn.attention import SDPBackend
    known = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    bad = [n for n in names if n not in known]
    if bad:
        sys.exit(f"sdpa_reference: --backends: unknown {bad}; expected some of {list(known)}")
    if not torch.cuda.is_available():
        sys.exit("sdpa_reference: needs a CUDA device")
    ours = {}
    if args.ours:
        try:
            with open(args.ours) as f:
                doc = json.load(f)
            for r in doc["results"]:
                key = (r["batch"], r["seq"], r["heads"], r["kv_heads"], r["head_dim"])
                ours[key] = (r["forward"]["ours_ms"], r["backward"]["ours_ms"])
            if doc["config"]["causal"] == args.no_causal:
                sys.exit(f"sdpa_reference: {args.ours} was measured with causal = {doc['config']['causal']}, "
                         f"this run with causal = {not args.no_causal}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"sdpa_reference: --ours {args.ours}: cannot read bench_attention's results ({e})")

    causal = not args.no_causal
    rows = []
    for cfg in configs:
        b, s, hq, hkv, hd = cfg
        fwd_flop = 4.0 * b * hq * s * s * hd * (0.5 if causal else 1.0)
        row = {"batch": b, "seq": s, "heads": hq, "kv_heads": hkv, "head_dim": hd, "backends": {}}
        for name in names:
            try:
                fwd_ms, bwd_ms, expanded = measure(torch, known[name], cfg, causal, args.reps, args.warmup)
                row["backends"][name] = {"forward_ms": fwd_ms, "forward_tflops": fwd_flop / fwd_ms / 1e9,
                                         "backward_ms": bwd_ms, "backward_tflops": 2.5 * fwd_flop / bwd_ms / 1e9,
                                         "gqa": "expanded before timing" if expanded else "native"}
                print(f"{b},{s},{hq},{hkv},{hd} {name:9s} fwd {fwd_flop / fwd_ms / 1e9:6.1f} TFLOP/s ({fwd_ms:.3f} ms)"
                      f"  bwd {2.5 * fwd_flop / bwd_ms / 1e9:6.1f} TFLOP/s ({bwd_ms:.3f} ms)"
                      f"{'  (GQA expanded)' if expanded else ''}", flush=True)
            except RuntimeError as e:
                row["backends"][name] = {"error": str(e).splitlines()[0][:200]}
                print(f"{b},{s},{hq},{hkv},{hd} {name:9s} unavailable: {str(e).splitlines()[0][:100]}", flush=True)
            torch.cuda.empty_cache()
        timed = {n: r for n, r in row["backends"].items() if "error" not in r}
        if timed:
            best_f = min(timed, key=lambda n: timed[n]["forward_ms"])
            best_b = min(timed, key=lambda n: timed[n]["backward_ms"])
            row["fastest"] = {"forward": best_f, "backward": best_b}
            if cfg in ours:
                o_f, o_b = ours[cfg]
                row["ours"] = {"forward_ms": o_f, "backward_ms": o_b,
                               "forward_vs_fastest": timed[best_f]["forward_ms"] / o_f,
                               "backward_vs_fastest": timed[best_b]["backward_ms"] / o_b}
                print(f"{b},{s},{hq},{hkv},{hd} ours vs fastest: forward {row['ours']['forward_vs_fastest']:.2f}x "
                      f"({best_f}), backward {row['ours']['backward_vs_fastest']:.2f}x ({best_b})", flush=True)
        rows.append(row)

    if args.out:
        doc = {"benchmark": "attention_sdpa_reference", "device": torch.cuda.get_device_name(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": args.commit,
               "torch": torch.__version__,
               "config": {"causal": causal, "dtype": "bf16", "reps": args.reps, "warmup": args.warmup,
                          "timing": "median of per-call CUDA event times",
                          "flop": "forward 4 B Hq S^2 hd (x 0.5 causal), backward 2.5 x forward",
                          "ours": args.ours or "not given"},
               "results": rows}
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
