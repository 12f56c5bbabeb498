#!/usr/bin/env python3
"""Checks our Llama against Hugging Face transformers' LlamaForCausalLM, in both directions.

  (a) transformers -> ours: build a small random LlamaForCausalLM in transformers (GQA, untied head, rope_theta
      500000, byte vocabulary; also with Llama 3.1 RoPE scaling, with a tied head, and saved as shards),
      save_pretrained (safetensors), run `llama_eval --model DIR --tokens ROWS --out JSON` on it, and compare the
      mean next-token loss and the last-position logits with transformers' own.
  (b) ours -> transformers: let llama_eval write a model (`--init-random SEED --preset P --save DIR`, and a
      re-save of an (a) model through `--model A --save DIR`), load it with LlamaForCausalLM.from_pretrained as
      it is, and compare the same way.

The reference is transformers in float64 (eager attention) on the weights as saved; llama_eval runs on the host in
fp32, so the relative errors are expected well below the tolerance (--tolerance, 1e-5). Weights of the (a)
models are drawn larger than transformers' initialisation (matrices N(0, 1/in), embedding N(0, 1), norm gains
N(1, 0.2^2)) so that attention is far from uniform and a wrong rotary layout or scaling moves the logits by much
more than the tolerance; the RoPE-scaling cases on those weights also report how far transformers' logits move
without the scaling, and fail if that is not far above the tolerance (a check that could not tell the difference
proves nothing). Our own initialisation (N(0, 0.02^2)) gives near-uniform attention, so for the random-init cases
of (b) the RoPE scaling is checked in the config transformers reads back instead.

  (c) pipeline_llama -> transformers (with --pipeline-llama BIN --text FILE): a Subspace Network trained for a few
      steps and written by `--export-hf DIR` loads in LlamaForCausalLM.from_pretrained as it is, with llama_eval's
      loss and logits on the same rows.

usage: check_transformers.py LLAMA_EVAL [--tolerance 1e-5] [--keep DIR] [--pipeline-llama BIN --text FILE]
Exit status: 0 all cases agree, 1 a case disagrees or failed to run, 2 bad usage.
"""

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


# --- transformers models ---------------------------------------------------------------------------------------

def hf_config(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, ffn=172, max_pos=64, theta=500000.0,
              tied=False, llama31=None):
    """A LlamaConfig in the form the installed transformers expects (rope_parameters in 5.x, rope_theta and
    rope_scaling before). llama31: None or dict(factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings)."""
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, hidden_act="silu", attention_bias=False,
                  mlp_bias=False, bos_token_id=None, eos_token_id=None)
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        rope = {"rope_type": "default", "rope_theta": theta}
        if llama31:
            rope = {"rope_type": "llama3", "rope_theta": theta, **llama31}
        kwargs["rope_parameters"] = rope
    else:
        kwargs["rope_theta"] = theta
        kwargs["rope_scaling"] = {"rope_type": "llama3", **llama31} if llama31 else None
    return LlamaConfig(**kwargs)


def build_model(config, seed):
    """A float32 LlamaForCausalLM of `config` with weights of order one (see the top of the file)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
            elif name == "model.embed_tokens.weight":
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model.eval()


def load_hf(directory):
    """LlamaForCausalLM.from_pretrained(directory) as it is, then float64 for the reference computation."""
    kwargs = {"attn_implementation": "eager"}
    model = LlamaForCausalLM.from_pretrained(directory, **kwargs)
    return model.to(torch.float64).eval()


def reference(model, rows):
    """transformers' mean next-token loss (labels = input_ids) and last-position logits, in float64."""
    model = model.to(torch.float64)
    model.config._attn_implementation = "eager"
    ids = torch.tensor(rows, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return float(out.loss), out.logits[:, -1, :].double().numpy()


# --- ours --------------------------------------------------------------------------------------------------------

def run_llama_eval(binary, args, workdir, name):
    """Runs llama_eval on the host; returns its JSON output (when --tokens is among args)."""
    out = os.path.join(workdir, name + ".json")
    cmd = [binary, "--device", "host"] + args
    if "--tokens" in args:
        cmd += ["--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("llama_eval exited with %d: %s\n%s%s" % (proc.returncode, " ".join(cmd), proc.stdout,
                                                                    proc.stderr))
    if "--tokens" not in args:
        return None
    with open(out) as f:
        return json.load(f)


def token_rows(vocab, rows, length, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(rows, length)).tolist()


def tokens_flag(rows):
    return ";".join(",".join(str(t) for t in row) for row in rows)


# --- comparison --------------------------------------------------------------------------------------------------

class Results:
    def __init__(self, tolerance):
        self.tolerance = tolerance
        self.passed = 0
        self.failed = 0

    def compare(self, case, ours, ref_loss, ref_logits, sensitivity=None, problems=()):
        """ours: llama_eval's JSON. Relative errors: |loss - ref| / |ref|, max |logit - ref| / max |ref|."""
        logits = np.asarray(ours["logits"], dtype=np.float64)
        problems = list(problems)
        if logits.shape != ref_logits.shape:
            problems.append("logits have shape %s, transformers' %s" % (logits.shape, ref_logits.shape))
            loss_err = logit_err = float("inf")
        else:
            scale = float(np.max(np.abs(ref_logits)))
            logit_err = float(np.max(np.abs(logits - ref_logits))) / scale
            loss_err = abs(ours["loss"] - ref_loss) / abs(ref_loss)
            if not logit_err <= self.tolerance:
                problems.append("logits relative error %.3e > %.1e" % (logit_err, self.tolerance))
            if not loss_err <= self.tolerance:
                problems.append("loss relative error %.3e > %.1e (ours %.8f, transformers %.8f)"
                                % (loss_err, self.tolerance, ours["loss"], ref_loss))
        extra = ""
        if sensitivity is not None:
            extra = ", without RoPE scaling the logits move by %.2e" % sensitivity
            if not sensitivity > 100 * self.tolerance:
                problems.append("RoPE scaling changes transformers' logits by only %.2e: this case cannot tell "
                                "scaled from unscaled RoPE" % sensitivity)
        status = "ok  " if not problems else "FAIL"
        print("%s %-58s loss %.6f (rel err %.2e), logits rel err %.2e%s"
              % (status, case, ref_loss, loss_err, logit_err, extra))
        for p in problems:
            print("     " + p)
        if problems:
            self.failed += 1
        else:
            self.passed += 1

    def error(self, case, e):
        print("FAIL %-58s %s" % (case, e))
        self.failed += 1


def hf_rope(config):
    """(rope_theta, llama3 scaling dict or None) of a transformers LlamaConfig, 4.x or 5.x."""
    params = getattr(config, "rope_parameters", None)
    if params:
        theta = params.get("rope_theta")
        scaling = params if params.get("rope_type") == "llama3" else None
    else:
        theta = config.rope_theta
        scaling = config.rope_scaling
    if scaling is not None:
        scaling = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                          "original_max_position_embeddings")}
    return float(theta), scaling


def config_problems(config, expect):
    """Differences between what transformers read from our config.json and what llama_eval was asked for."""
    theta, scaling = hf_rope(config)
    got = {"tie_word_embeddings": bool(config.tie_word_embeddings), "rope_theta": theta, "rope_scaling": scaling}
    return ["config %s: transformers read %r, expected %r" % (k, got[k], v) for k, v in expect.items()
            if got[k] != v]


def without_scaling(model):
    """The same weights with plain RoPE (same theta): how much the scaling matters to these logits."""
    config = LlamaConfig.from_dict(model.config.to_dict())
    theta, _ = hf_rope(config)
    if getattr(config, "rope_parameters", None):
        config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    else:
        config.rope_scaling = None
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    return plain


def relative_change(a, b):
    return float(np.max(np.abs(a - b))) / float(np.max(np.abs(a)))


# --- the cases ---------------------------------------------------------------------------------------------------

LLAMA31 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)


def hf_to_ours(binary, workdir, results):
    """(a): transformers writes, llama_eval reads. Returns {case: directory} for the re-save cases of (b)."""
    cases = [
        ("GQA 4/2, untied, theta 5e5, vocab 256", dict(), {}, 24),
        ("Llama 3.1 RoPE scaling (original max 16)", dict(max_pos=128, llama31=LLAMA31), {}, 48),
        ("tied LM head", dict(tied=True), {}, 24),
        ("sharded safetensors (model.safetensors.index.json)", dict(), {"max_shard_size": "100KB"}, 24),
    ]
    saved = {}
    for i, (case, cfg_args, save_args, length) in enumerate(cases):
        name = "a%d" % i
        label = "(a) transformers -> ours: " + case
        try:
            config = hf_config(**cfg_args)
            model = build_model(config, seed=100 + i)
            directory = os.path.join(workdir, name)
            model.save_pretrained(directory, safe_serialization=True, **save_args)
            if "max_shard_size" in save_args and not os.path.exists(
                    os.path.join(directory, "model.safetensors.index.json")):
                raise RuntimeError("save_pretrained wrote no shard index (max_shard_size too large?)")
            rows = token_rows(config.vocab_size, 3, length, seed=200 + i)
            ref_loss, ref_logits = reference(model, rows)
            sensitivity = None
            if cfg_args.get("llama31"):
                sensitivity = relative_change(ref_logits, reference(without_scaling(model), rows)[1])
            ours = run_llama_eval(binary, ["--model", directory, "--tokens", tokens_flag(rows)], workdir, name)
            results.compare(label, ours, ref_loss, ref_logits, sensitivity)
            saved[case] = (directory, cfg_args)
        except Exception as e:  # noqa: BLE001 — report every case, then fail
            results.error(label, "%s: %s" % (type(e).__name__, e))
    return saved


def ours_to_hf(binary, workdir, results, hf_dirs):
    """(b): llama_eval writes, LlamaForCausalLM.from_pretrained reads."""
    micro_scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8}
    random_cases = [
        ("random init, preset tiny", ["--init-random", "7", "--preset", "tiny"], 256, 32,
         {"tie_word_embeddings": False, "rope_theta": 500000.0, "rope_scaling": None}),
        ("random init, preset micro, tied, Llama 3.1 RoPE scaling",
         ["--init-random", "8", "--preset", "micro", "--tied", "true", "--rope-scaling-factor", "8",
          "--rope-original-max", "8"], 32, 16,
         {"tie_word_embeddings": True, "rope_theta": 10000.0, "rope_scaling": micro_scaling}),
    ]
    for i, (case, args, vocab, length, expect) in enumerate(random_cases):
        name = "b%d" % i
        label = "(b) ours -> transformers: " + case
        try:
            directory = os.path.join(workdir, name)
            rows = token_rows(vocab, 3, length, seed=300 + i)
            ours = run_llama_eval(binary, args + ["--save", directory, "--tokens", tokens_flag(rows)], workdir, name)
            model = load_hf(directory)
            ref_loss, ref_logits = reference(model, rows)
            results.compare(label, ours, ref_loss, ref_logits, problems=config_problems(model.config, expect))
        except Exception as e:  # noqa: BLE001
            results.error(label, "%s: %s" % (type(e).__name__, e))

    # Re-saves: weights of order one (from (a)), written by our save_model and config.json writer.
    for i, (case, (source, cfg_args)) in enumerate(hf_dirs.items()):
        name = "r%d" % i
        label = "(b) ours -> transformers: re-saved " + case
        try:
            directory = os.path.join(workdir, name)
            length = 48 if cfg_args.get("llama31") else 24
            rows = token_rows(256, 2, length, seed=400 + i)
            ours = run_llama_eval(binary, ["--model", source, "--save", directory, "--save-dtype", "f32",
                                           "--tokens", tokens_flag(rows)], workdir, name)
            model = load_hf(directory)
            ref_loss, ref_logits = reference(model, rows)
            theta, scaling = hf_rope(model.config)
            expect = {"tie_word_embeddings": bool(cfg_args.get("tied", False)), "rope_theta": 500000.0,
                      "rope_scaling": cfg_args.get("llama31")}
            sensitivity = None
            if scaling is not None:
                sensitivity = relative_change(ref_logits, reference(without_scaling(model), rows)[1])
            results.compare(label, ours, ref_loss, ref_logits, sensitivity, config_problems(model.config, expect))
        except Exception as e:  # noqa: BLE001
            results.error(label, "%s: %s" % (type(e).__name__, e))


def pipeline_export_to_hf(llama_eval, pipeline_llama, workdir, results, text):
    """(c): a Subspace Network trained by pipeline_llama and written by --export-hf (E_fix + E Uᵀ and U Z multiplied
    out) is a plain Llama: transformers loads the directory as it is and gives llama_eval's loss and logits."""
    for variant in ("reparam", "projected"):
        name = "c_" + variant
        label = "(c) pipeline_llama --export-hf -> transformers: subspace, " + variant
        try:
            directory = os.path.join(workdir, name)
            cmd = [pipeline_llama, "--device", "host", "--text", text, "--stages", "2", "--preset", "micro",
                   "--vocab", "256", "--layers", "4", "--seq", "32", "--batch", "2", "--microbatches", "2",
                   "--steps", "4", "--lr", "3e-3", "--warmup", "1", "--threads", "1", "--seed", "11",
                   "--compressor", "subspace", "--k", "4", "--variant", variant, "--samples", "0",
                   "--export-hf", directory]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env=dict(os.environ, SUBSPACE_DATA_DIR=os.path.join(workdir, "cache")))
            if proc.returncode != 0:
                raise RuntimeError("pipeline_llama exited with %d: %s\n%s%s"
                                   % (proc.returncode, " ".join(cmd), proc.stdout, proc.stderr))
            rows = token_rows(256, 3, 32, seed=500)
            ours = run_llama_eval(llama_eval, ["--model", directory, "--tokens", tokens_flag(rows)], workdir, name)
            model = load_hf(directory)
            ref_loss, ref_logits = reference(model, rows)
            results.compare(label, ours, ref_loss, ref_logits)
        except Exception as e:  # noqa: BLE001
            results.error(label, "%s: %s" % (type(e).__name__, e))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("llama_eval", help="path of the llama_eval binary")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest relative error of the loss and of the logits (default 1e-5)")
    parser.add_argument("--keep", help="write the models and outputs here and keep them (default: a temp dir)")
    parser.add_argument("--pipeline-llama", help="also check pipeline_llama --export-hf (this binary) on --text")
    parser.add_argument("--text", help="training text of the --pipeline-llama case")
    args = parser.parse_args()
    if args.pipeline_llama and not (os.access(args.pipeline_llama, os.X_OK) and args.text):
        print("check_transformers: --pipeline-llama needs an executable binary and --text FILE")
        return 2
    if not os.access(args.llama_eval, os.X_OK):
        print("check_transformers: llama_eval binary '%s' is not an executable file" % args.llama_eval)
        return 2

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    transformers.utils.logging.disable_progress_bar()
    print("check_transformers: torch %s, transformers %s, llama_eval %s, tolerance %.1e"
          % (torch.__version__, transformers.__version__, args.llama_eval, args.tolerance))
    results = Results(args.tolerance)
    with tempfile.TemporaryDirectory(prefix="subspace-hf-") as tmp:
        workdir = args.keep or tmp
        os.makedirs(workdir, exist_ok=True)
        hf_dirs = hf_to_ours(args.llama_eval, workdir, results)
        ours_to_hf(args.llama_eval, workdir, results, hf_dirs)
        if args.pipeline_llama:
            pipeline_export_to_hf(args.llama_eval, args.pipeline_llama, workdir, results, args.text)
    print("%d passed, %d failed" % (results.passed, results.failed))
    return 0 if results.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
