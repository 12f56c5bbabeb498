#!/usr/bin/env python3
"""PyTorch reference for bench/llama_step: the same Llama 3 model and training step, eager and torch.compile.

Builds the model our trainer builds (pre-norm RMSNorm eps 1e-5, RoPE theta 500000 in Hugging Face's
half-split layout, grouped-query causal attention through SDPA, SwiGLU MLP, untied LM head, cross-entropy),
trains it with bf16 autocast and fused AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), and reports
tokens/s, model TFLOP/s (FLOP/token = 6 N_non-embedding + 12 L d T, LM head included in N) and peak memory
for each configuration. Random tokens; timing after warm-up steps, with CUDA events.

    python3 bench/llama_step/torch_reference.py --configs 124m,1b,2b --out results.json
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


def measure(torch, name, compiled, steps, warmup):
    vocab, d, layers, heads, kv_heads, ffn, seq, batch = CONFIGS[name]
    torch.manual_seed(0)
    model = build(torch, vocab, d, layers, heads, kv_heads, ffn, seq).cuda()
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not model.embed_tokens.weight]
    no_decay = [p for p in model.parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), fused=True)
    fwd = torch.compile(model) if compiled else model
    tokens = torch.randint(0, vocab, (batch, seq), device="cuda")
    targets = torch.randint(0, vocab, (batch, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / steps
    n_non_embedding = layers * (2 * d * d + 2 * d * kv_heads * (d // heads) + 3 * d * ffn + 2 * d) + d + vocab * d
    flops_per_token = 6 * n_non_embedding + 12 * layers * d * seq
    tok_per_s = batch * seq / seconds
    result = {
        "config": name, "mode": "torch.compile" if compiled else "eager", "batch": batch, "seq": seq,
        "step_ms": seconds * 1e3, "tok_per_s": tok_per_s, "model_tflops": tok_per_s * flops_per_token / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "final_loss": float(loss),
    }
    del model, opt, fwd
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
    args = parser.parse_args()
    names = [c for c in args.configs.split(",") if c]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        sys.exit(f"torch_reference: unknown config(s) {bad}; expected some of {list(CONFIGS)}")
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in ("eager", "compile") for m in modes):
        sys.exit(f"torch_reference: --modes takes eager and/or compile, got {args.modes}")
    import torch
    if not torch.cuda.is_available():
        sys.exit("torch_reference: needs a CUDA device")
    results = []
    for name in names:
        for mode in modes:
            r = measure(torch, name, mode == "compile", args.steps, args.warmup)
            results.append(r)
            print(f"{name:5s} {r['mode']:13s} {r['tok_per_s']/1e3:8.1f}k tok/s  {r['model_tflops']:6.1f} TFLOP/s  "
                  f"{r['peak_mem_gib']:5.1f} GiB  loss {r['final_loss']:.3f}", flush=True)
    if args.out:
        doc = {"benchmark": "llama_step_torch_reference", "device": torch.cuda.get_device_name(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": args.commit,
               "torch": torch.__version__, "config": {"steps": args.steps, "warmup": args.warmup}, "results": results}
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
