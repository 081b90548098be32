"""Training-step benchmark (paper Table 24): LR-LoRA against PEFT LoRA/DoRA, full fine-tuning and the
frozen floor, on decoder layers of the paper's shapes with random weights.

    make bench                                        # σ op + this, CPU, results in benchmarks/results/
    python -m benchmarks.train_step --quick           # 2 Qwen2 layers, 512 tokens, the main methods
    python -m benchmarks.train_step --device cuda     # same cases on a GPU (bf16 base weights)
    python -m benchmarks.train_step --models qwen2_0.5b:2 llama3_8b:1 --tokens 512 2048 8192

A step is forward, backward and AdamW (lr 1e-4) on random token ids (causal-LM loss), sequences of
256 tokens, ``--tokens`` per step. Models: ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` built from the
paper's configs (Qwen2-0.5B: hidden 896, MLP 4864, 14 heads / 2 KV heads; LLaMA3-8B: 4096, 14336,
32 / 8) with ``--layers`` decoder layers and a ``--vocab``-token vocabulary (default 8192, not 151,936 /
128,256: the embedding and head cost every method the same, and at full size they alone would take
most of a CPU step, so a smaller vocabulary makes the ratios harder, not easier, to meet).

Methods (all seven projections adapted, r = 16, α = 32):
  frozen       nothing trains; the input embeddings require grad, so backward still runs through every
               layer (activation gradients only): the floor any adapter pays
  lora         PEFT LoRA, dropout 0;       lora_d05   the same with dropout 0.05
  dora         PEFT DoRA (use_dora=True), dropout 0
  lrlora       LR-LoRA (lrlora.apply_lrlora, sinc, K = 50), dropout 0, the fused layer
  lrlora_d05   the same with dropout 0.05
  lrlora_ref   LR-LoRA through plain autograd (``layer.fused = False``): the layer before the fused function
  full         every parameter trains

Step times: one subprocess per (model, layers, tokens) builds every method's model and runs one step of
each in turn, ``--repeats`` rounds after a warm-up round, so that on a shared, noisy CPU the ratios
compare steps taken seconds apart (``median_step_s``; ``--no-interleave`` keeps the per-case times).
Memory: every case in its own subprocess (``--worker``), one after another, so peaks do not leak between
cases; it also times its own steps after a warm-up (``median_step_s_isolated``, slowed by the pinned
mmap threshold below: every large allocation faults its pages in) and records peak memory above the
model: on CPU the
process's peak RSS (VmHWM, reset after the model and optimizer are built; glibc's mmap threshold pinned so
freed blocks leave the RSS) minus its RSS then; on CUDA max_memory_allocated minus memory_allocated.
The AdamW state is created in the warm-up step and counts as memory above the model.

Inference (``--inference``, on by default): the forward of a model whose LR-LoRA adapters were merged
(``merge_and_unload``) against the same model's base forward, alternating, in one process.

Writes benchmarks/results/train_step[_cuda].json atomically, with machine info and the load average
before and after every case (this CPU is shared: read ratios, not absolute times).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import (
    MALLOC_ENV,
    ROOT,
    machine_info,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    write_json_atomic,
)
from lrlora import cli
from lrlora.errors import ConfigError

MODELS = {
    # Qwen2-0.5B (config.json of Qwen/Qwen2-0.5B)
    "qwen2_0.5b": dict(family="qwen2", hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                       num_key_value_heads=2, rope_theta=1_000_000.0, tie_word_embeddings=True),
    # Meta-Llama-3-8B (config.json)
    "llama3_8b": dict(family="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, rope_theta=500_000.0, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("frozen", "lora", "lora_d05", "dora", "lrlora", "lrlora_d05", "lrlora_ref", "full")
QUICK_METHODS = ("frozen", "lora", "lora_d05", "lrlora", "lrlora_d05")
SEQ = 256
R = 16


def build_model(model: str, layers: int, vocab: int, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(MODELS[model])
    family = spec.pop("family")
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = cfg_cls(num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096, **spec)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        m = model_cls(cfg)
    return m.to(dtype)


def adapt(m, method: str):
    """Apply ``method``; returns (model, parameters to optimise, whether the input embeddings need grad)."""
    if method == "frozen":
        m.requires_grad_(False)
        return m, [], True
    if method == "full":
        m.requires_grad_(True)
        return m, [p for p in m.parameters() if p.requires_grad], False
    if method.startswith("lrlora"):
        from lrlora import LRLoRAConfig, apply_lrlora, lrlora_modules

        dropout = 0.05 if method.endswith("_d05") else 0.0
        m = apply_lrlora(m, LRLoRAConfig(r=R, target_modules=TARGETS, dropout=dropout))
        if method == "lrlora_ref":
            for layer in lrlora_modules(m).values():
                layer.fused = False
        return m, [p for p in m.parameters() if p.requires_grad], False
    from peft import LoraConfig, get_peft_model

    dropout = 0.05 if method.endswith("_d05") else 0.0
    cfg = LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS, lora_dropout=dropout,
                     use_dora=method == "dora", task_type="CAUSAL_LM")
    m = get_peft_model(m, cfg)
    return m, [p for p in m.parameters() if p.requires_grad], False


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_step(args, method):
    """(model, trainable parameters, step function) for one case: a step is fwd, bwd and AdamW."""
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    m = build_model(args.case_model, args.case_layers, args.vocab, dtype, device)
    m, params, embeds_grad = adapt(m, method)
    m.train()
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    batch = args.case_tokens // SEQ
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (batch, SEQ), generator=g).to(device)
    embed = m.get_input_embeddings()

    def step():
        if embeds_grad:
            x = embed(ids).detach().requires_grad_()
            loss = m(inputs_embeds=x, labels=ids).loss
        else:
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss)

    return m, params, step


def worker(args) -> dict:
    device = args.device
    cuda = device.startswith("cuda")
    m, params, step = make_step(args, args.case_method)

    # Memory above the model: after the model is built (and adapted), before the first step.
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    t0 = time.perf_counter()
    loss0 = step()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - before
    med = statistics.median(times)
    trainable = sum(p.numel() for p in params)
    return {"median_step_s": med, "tokens_per_s": args.case_tokens / med, "first_step_s": first, "times_s": times,
            "peak_above_model_bytes": int(peak), "model_bytes": int(before), "trainable_params": trainable,
            "first_loss": loss0}


def interleaved_worker(args) -> dict:
    """Step times of every method in ONE process, one step of each in turn, ``--repeats`` rounds after a
    warm-up round: on a shared, noisy machine the ratios then compare steps taken seconds apart."""
    cases = {method: make_step(args, method)[2] for method in args.case_methods}
    times = {method: [] for method in cases}
    for rnd in range(args.repeats + 1):
        for method, step in cases.items():
            _sync(args.device)
            t0 = time.perf_counter()
            step()
            _sync(args.device)
            if rnd > 0:
                times[method].append(time.perf_counter() - t0)
    return {"median_step_s": {k: statistics.median(v) for k, v in times.items()}, "times_s": times}


def inference_worker(args) -> dict:
    """Forward time of the base model vs the same model with LR-LoRA adapters merged in, alternating."""
    from lrlora import LRLoRAConfig, apply_lrlora, lrlora_modules, merge_and_unload

    device = args.device
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    base = build_model(args.case_model, args.case_layers, args.vocab, dtype, device).eval()
    merged = build_model(args.case_model, args.case_layers, args.vocab, dtype, device)
    merged = apply_lrlora(merged, LRLoRAConfig(r=R, target_modules=TARGETS))
    with torch.no_grad():  # a trained-looking adapter: ΔW ≠ 0
        for layer in lrlora_modules(merged).values():
            layer.transfer.a.normal_(0, 0.01)
    merged = merge_and_unload(merged).eval()
    ids = torch.randint(0, args.vocab, (args.case_tokens // SEQ, SEQ), generator=torch.Generator().manual_seed(1)).to(device)
    times = {"base": [], "merged": []}
    with torch.no_grad():
        for mdl in (base, merged):
            mdl(input_ids=ids)
        for _ in range(max(args.repeats, 3)):
            for name, mdl in (("base", base), ("merged", merged)):
                _sync(device)
                t0 = time.perf_counter()
                mdl(input_ids=ids)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    b, mm = statistics.median(times["base"]), statistics.median(times["merged"])
    same_type = {type(x).__name__ for x in merged.modules()} <= {type(x).__name__ for x in base.modules()}
    return {"base_forward_s": b, "merged_forward_s": mm, "merged_over_base": mm / b, "times_s": times,
            "merged_is_plain_model": same_type}


def run_case(args, model, layers, tokens, method) -> dict:
    case = {"model": model, "layers": layers, "tokens": tokens, "method": method, "load_average_before": os.getloadavg()}
    # With interleaved timing, a memory case needs only its warm-up step and one more.
    timed_here = method.startswith("interleaved") or method == "inference" or args.no_interleave
    repeats = args.repeats if timed_here else 1
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--device", args.device, "--repeats", str(repeats), "--vocab", str(args.vocab),
           "--threads", str(args.threads), "--worker", model, str(layers), str(tokens), method]
    # The pinned mmap threshold makes peak RSS measure the computation, but it also makes every large
    # allocation a fresh mmap whose pages fault in (tens of ms per 17 MB here): timing runs without it.
    timing_only = method.startswith("interleaved") or method == "inference"
    env = {**os.environ, **({} if timing_only else MALLOC_ENV), "OMP_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    case["wall_s"] = time.perf_counter() - t0
    case["load_average_after"] = os.getloadavg()
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        case["failed"] = err[-1] if err else f"exit {proc.returncode}"
    else:
        case.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return case


def summarise(cases: list[dict]) -> list[dict]:
    """Per (model, layers, tokens): LR-LoRA against LoRA (same dropout), time ratio and memory above LoRA's."""
    out = []
    by = {(c["model"], c["layers"], c["tokens"], c["method"]): c for c in cases if "median_step_s" in c}
    for (model, layers, tokens, method), c in by.items():
        pairs = {"lrlora": "lora", "lrlora_d05": "lora_d05", "lrlora_ref": "lora", "dora": "lora", "full": "lora",
                 "frozen": "lora"}
        if method not in pairs or (model, layers, tokens, pairs[method]) not in by:
            continue
        ref = by[(model, layers, tokens, pairs[method])]
        if ("median_step_s_isolated" in c) != ("median_step_s_isolated" in ref):
            continue  # one timed side by side, the other alone: not comparable
        out.append({"model": model, "layers": layers, "tokens": tokens, "method": method, "vs": pairs[method],
                    "step_time_ratio": c["median_step_s"] / ref["median_step_s"],
                    "memory_above_vs_bytes": c["peak_above_model_bytes"] - ref["peak_above_model_bytes"]})
    return out


def largest_adapted_matrix_bytes(model: str) -> int:
    spec = MODELS[model]
    return spec["hidden_size"] * spec["intermediate_size"] * 4  # fp32, gate/up/down


def main(argv=None):
    ap = cli.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=None, help="MODEL:LAYERS, e.g. qwen2_0.5b:2 llama3_8b:1")
    ap.add_argument("--tokens", nargs="+", type=int, default=None, help="tokens per step (multiples of 256)")
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="qwen2_0.5b:2, 512 tokens, the main methods, 2 repeats")
    ap.add_argument("--no-inference", action="store_true")
    ap.add_argument("--no-interleave", action="store_true", help="step times from the per-case processes only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "LAYERS", "TOKENS", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        args.case_model, layers, tokens, args.case_method = args.worker
        args.case_layers, args.case_tokens = int(layers), int(tokens)
        if args.case_method.startswith("interleaved:"):
            args.case_methods = args.case_method.split(":", 1)[1].split(",")
            res = interleaved_worker(args)
        else:
            res = inference_worker(args) if args.case_method == "inference" else worker(args)
        print(json.dumps(res))
        return

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no GPU; run on a GPU machine or drop --device cuda")
    if args.quick:
        models, tokens, methods = ["qwen2_0.5b:2"], [512], list(QUICK_METHODS)
        args.repeats = min(args.repeats, 2)
    else:
        models = ["qwen2_0.5b:2", "qwen2_0.5b:4", "llama3_8b:1"]
        tokens = [512, 2048, 8192]
        methods = list(METHODS)
    models, tokens, methods = args.models or models, args.tokens or tokens, args.methods or methods
    for t in tokens:
        if t % SEQ:
            raise ConfigError(f"--tokens {t} is not a multiple of the sequence length {SEQ}; use e.g. 512 or 2048")
    parsed = []
    for spec in models:
        name, _, layers = spec.partition(":")
        if name not in MODELS or not layers.isdigit():
            raise ConfigError(f"--models {spec!r}: use MODEL:LAYERS with MODEL one of {', '.join(MODELS)}")
        parsed.append((name, int(layers)))

    out = Path(args.out or Path(__file__).parent / "results" / f"train_step{'_cuda' if cuda else ''}.json")
    results = {"machine": machine_info(args.device), "threads": args.threads, "repeats": args.repeats,
               "vocab": args.vocab, "seq_len": SEQ, "r": R, "target_modules": TARGETS,
               "command": " ".join(["python", "-m", "benchmarks.train_step", *sys.argv[1:]]),
               "load_average_start": os.getloadavg(), "cases": [], "inference": []}
    print(f"{'model':<11} {'L':>2} {'tokens':>6} {'method':<11} {'step s':>8} {'tok/s':>8} {'mem above model MB':>19}")
    groups = [(m, l, t) for m, l in parsed for t in tokens]
    if not (args.models or args.tokens or args.quick or cuda):
        # CPU default (~40 min): every size for 2 Qwen2 layers; 4 layers (memory growth with depth) and the
        # LLaMA3-8B layer at 512 tokens only; cheapest first, so an interrupted run keeps the most cases.
        groups = [(m, l, t) for m, l, t in groups if (m, l) == ("qwen2_0.5b", 2) or t == min(tokens)]
        groups.sort(key=lambda g: (g[2] > 2048, g[0] == "llama3_8b", g[2], g[1]))
    for model, layers, tok in groups:
        it = {}
        if not args.no_interleave:
            c = run_case(args, model, layers, tok, "interleaved:" + ",".join(methods))
            results.setdefault("timing", []).append(c)
            if "failed" in c:
                print(f"{model:<11} {layers:>2} {tok:>6} interleaved timing failed: {c['failed']}")
            it = c.get("median_step_s", {})
        for method in methods:
            c = run_case(args, model, layers, tok, method)
            if method in it:  # the step time measured side by side with the other methods
                c["median_step_s_isolated"] = c.get("median_step_s")
                c["median_step_s"] = it[method]
                c["tokens_per_s"] = tok / it[method]
            results["cases"].append(c)
            if "failed" in c:
                print(f"{model:<11} {layers:>2} {tok:>6} {method:<11}   failed: {c['failed']}")
            else:
                print(f"{model:<11} {layers:>2} {tok:>6} {method:<11} {c['median_step_s']:>8.3f} "
                      f"{c['tokens_per_s']:>8.0f} {c['peak_above_model_bytes'] / 2**20:>19.0f}", flush=True)
            results["summary"] = summarise(results["cases"])
            write_json_atomic(results, out)  # partial results survive an interrupted run
        if not args.no_inference:
            c = run_case(args, model, layers, tok, "inference")
            results["inference"].append(c)
            if "failed" not in c:
                print(f"{model:<11} {layers:>2} {tok:>6} inference: merged / base forward = {c['merged_over_base']:.3f}")
    results["summary"] = summarise(results["cases"])
    for model, _ in parsed:
        results.setdefault("largest_adapted_matrix_bytes", {})[model] = largest_adapted_matrix_bytes(model)
    results["load_average_end"] = os.getloadavg()
    write_json_atomic(results, out)
    print("\nLR-LoRA vs LoRA (same dropout): step time ratio, memory above LoRA's")
    for s in results["summary"]:
        if s["method"].startswith("lrlora"):
            print(f"  {s['model']} L={s['layers']} {s['tokens']} tok {s['method']:<11} "
                  f"{s['step_time_ratio']:.2f}×  {s['memory_above_vs_bytes'] / 2**20:+.0f} MB")
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
