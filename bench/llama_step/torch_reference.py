#!/usr/bin/env python3
"""PyTorch reference for bench/llama_step: the same Llama 3 model and training step, eager and torch.compile.

Builds the model our trainer builds (pre-norm RMSNorm eps 1e-5, RoPE theta 500000 in Hugging Face's
half-split layout, grouped-query causal attention through SDPA, SwiGLU MLP, untied LM head, cross-entropy),
trains it with bf16 autocast and fused AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), and reports
tokens/s, model TFLOP/s (FLOP/token = 6 N_non-embedding + 12 L d T, LM head included in N) and peak memory
for each configuration. Random tokens; timing after warm-up steps, with CUDA events.

With --device cpu it runs the fp32 step on the CPU instead (no autocast, AdamW's foreach implementation, wall-clock
timing, --threads intra-op threads): the reference of our host step (bench/llama_step/host.sh).

    python3 bench/llama_step/torch_reference.py --configs 124m,1b,2b --out results.json
    python3 bench/llama_step/torch_reference.py --device cpu --configs tiny --modes eager --threads 2
"""
import argparse
import json
import os
import sys
import time

CONFIGS = {
    # name: vocab, d, layers, heads, kv_heads, ffn, T, batch
    "124m": (50304, 768, 12, 12, 4, 2048, 1024, 16),
    "1b": (50304, 2048, 16, 32, 8, 8192, 2048, 8),
    "2b": (50304, 4096, 8, 32, 8, 11008, 1024, 8),
    "tiny": (256, 128, 4, 4, 2, 344, 256, 8),  # the README main job's model and batch (examples/train_llama)
}


def build(torch, vocab, d, layers, heads, kv_heads, ffn, seq):
    nn = torch.nn
    F = torch.nn.functional
    hd = d // heads

    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    pos = torch.arange(seq, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)

    def rotate_half(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([-x2, x1], dim=-1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = nn.RMSNorm(d, eps=1e-5)
            self.q_proj = nn.Linear(d, d, bias=False)
            self.k_proj = nn.Linear(d, kv_heads * hd, bias=False)
            self.v_proj = nn.Linear(d, kv_heads * hd, bias=False)
            self.o_proj = nn.Linear(d, d, bias=False)
            self.post_attention_layernorm = nn.RMSNorm(d, eps=1e-5)
            self.gate_proj = nn.Linear(d, ffn, bias=False)
            self.up_proj = nn.Linear(d, ffn, bias=False)
            self.down_proj = nn.Linear(ffn, d, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            h = self.input_layernorm(x)
            q = self.q_proj(h).view(b, t, heads, hd).transpose(1, 2)
            k = self.k_proj(h).view(b, t, kv_heads, hd).transpose(1, 2)
            v = self.v_proj(h).view(b, t, kv_heads, hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
            h = self.post_attention_layernorm(x)
            return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, d)
            self.layers = nn.ModuleList([Block() for _ in range(layers)])
            self.norm = nn.RMSNorm(d, eps=1e-5)
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

        def forward(self, tokens, targets):
            x = self.embed_tokens(tokens)
            for layer in self.layers:
                x = layer(x, self.cos, self.sin)
            logits = self.lm_head(self.norm(x))
            return F.cross_entropy(logits.float().view(-1, vocab), targets.view(-1))

    return Llama()


def measure(torch, name, compiled, steps, warmup, device):
    vocab, d, layers, heads, kv_heads, ffn, seq, batch = CONFIGS[name]
    cuda = device == "cuda"
    torch.manual_seed(0)
    model = build(torch, vocab, d, layers, heads, kv_heads, ffn, seq).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not model.embed_tokens.weight]
    no_decay = [p for p in model.parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), **({"fused": True} if cuda else {"foreach": True}))
    fwd = torch.compile(model) if compiled else model
    tokens = torch.randint(0, vocab, (batch, seq), device=device)
    targets = torch.randint(0, vocab, (batch, seq), device=device)

    def step():
        if cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(tokens, targets)
        else:
            loss = fwd(tokens, targets)  # fp32, as our host step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    wall = time.perf_counter()
    per_step = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        if not cuda:
            float(loss.detach())  # the step is done (it is on the CPU already)
            per_step.append(time.perf_counter() - t0)
    if cuda:
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / steps
    else:
        seconds = (time.perf_counter() - wall) / steps
    n_non_embedding = layers * (2 * d * d + 2 * d * kv_heads * (d // heads) + 3 * d * ffn + 2 * d) + d + vocab * d
    flops_per_token = 6 * n_non_embedding + 12 * layers * d * seq
    tok_per_s = batch * seq / seconds
    result = {
        "config": name, "mode": "torch.compile" if compiled else "eager", "batch": batch, "seq": seq,
        "step_ms": seconds * 1e3, "tok_per_s": tok_per_s, "model_tflops": tok_per_s * flops_per_token / 1e12,
        "final_loss": float(loss.detach()),
    }
    if cuda:
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["step_ms_each"] = [t * 1e3 for t in per_step]
    del model, opt, fwd
    if cuda:
        torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="124m,1b,2b", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--modes", default="eager,compile", help="eager, compile or both")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--out", help="write the results as JSON here (temporary file + rename)")
    parser.add_argument("--commit", default="unknown", help="the subspace commit measured alongside")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (bf16 autocast) or cpu (fp32)")
    parser.add_argument("--threads", type=int, default=0, help="cpu: intra-op threads (0: PyTorch's default)")
    args = parser.parse_args()
    names = [c for c in args.configs.split(",") if c]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        sys.exit(f"torch_reference: unknown config(s) {bad}; expected some of {list(CONFIGS)}")
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in ("eager", "compile") for m in modes):
        sys.exit(f"torch_reference: --modes takes eager and/or compile, got {args.modes}")
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_reference: needs a CUDA device (or --device cpu)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results = []
    for name in names:
        for mode in modes:
            r = measure(torch, name, mode == "compile", args.steps, args.warmup, args.device)
            results.append(r)
            memory = f"{r['peak_mem_gib']:5.1f} GiB  " if "peak_mem_gib" in r else ""
            print(f"{name:5s} {r['mode']:13s} {r['tok_per_s']/1e3:8.1f}k tok/s  {r['model_tflops']:6.3f} TFLOP/s  "
                  f"{memory}loss {r['final_loss']:.3f}", flush=True)
    if args.out:
        device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
        doc = {"benchmark": "llama_step_torch_reference", "device": device,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": args.commit,
               "torch": torch.__version__, "config": {"steps": args.steps, "warmup": args.warmup,
                                                      "device": args.device}, "results": results}
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
