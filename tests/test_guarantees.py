"""Nothing lost, nothing false: two tables of bad inputs and faults -- the library and harness called in Python
(CASES), and every entry point's command line (CLI_CASES: exit status 2 and exactly one `error:` line) -- each
leaving every file on disk as it was; then the data-loss and false-result cases one by one (a copied outputs
folder, changed data, an empty answer, two results files for one run, --out over a user's file, a damaged
report marker, make clean), leftovers, a NaN run, two configurations under one name, a finished run re-run.

    python -m pytest -q tests/test_guarantees.py            # the tables and the rest (CPU, ~3 min)
    python -m pytest -q -m slow tests/test_guarantees.py    # + every entry point as a process; kill -9, resumed
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from baselines import apply_adapter, load_adapted
from experiments import hydra_cli
from experiments.backbones import build_backbone
from experiments.results import write_results
from experiments.train import adapter_kwargs, run
from lrlora import LRLoRAConfig, apply_lrlora, cli, load_adapter, lrlora_modules, save_adapter
from lrlora._atomic import atomic_directory, atomic_file, exclusive_lock, lock_file
from lrlora.errors import UserError
from tests.test_harness import cfg_for as _harness_cfg

# One fixed name for the runs below: names follow the config (experiments/naming.py), and these faults are
# about what happens inside one run folder, whichever name it has.
RUN = "tiny_encoder__lrlora__bbc_news__r2__s42"


def cfg_for(tmp_path, backbone="tiny_encoder", adapter="lrlora", extra=()):
    named = any(e.startswith("run_name=") for e in extra)
    return _harness_cfg(tmp_path, backbone, adapter, [*extra] if named else [*extra, f"run_name={RUN}"])
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


def tiny(adapter="lora"):
    """A fresh tiny BERT classifier and the kwargs the harness would give `adapter`."""
    torch.manual_seed(0)
    cfg = cfg_for(Path("/nonexistent"), "tiny_encoder", adapter)
    model = build_backbone(cfg.backbone, "classification", 5)[0]
    return model, adapter_kwargs(cfg)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A finished LR-LoRA run, an unfinished one (checkpoint, no results), a LoRA and an LR-LoRA adapter
    folder, a PEFT-only folder, and a folder of someone's notes: what the faults below must leave alone."""
    root = tmp_path_factory.mktemp("world")
    os.environ["HF_HUB_OFFLINE"] = "1"
    run(cfg_for(root / "out"))
    run(cfg_for(root / "part", extra=["trainer.max_steps=4", "trainer.save_every=2"]))
    part = root / "part" / "runs" / RUN
    (root / "part" / "results" / f"{RUN}.json").unlink()  # as if killed after the step-4 checkpoint
    meta = json.loads((part / "run.json").read_text())
    (part / "run.json").write_text(json.dumps({**meta, "status": "running"}))
    model, kw = tiny("lora")
    apply_adapter(model, name="lora", **kw).save(root / "lora_adapter")
    model, kw = tiny("lrlora")  # the library's own format (the harness saves LR-LoRA in PEFT's, lrlora.peft)
    save_adapter(apply_lrlora(model, LRLoRAConfig(**kw)), root / "lrlora_adapter")
    model, kw = tiny("lrlora")
    apply_adapter(model, name="lrlora", **kw).save(root / "lrlora_run_adapter")  # as a harness run saves it
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("my notes\n")
    (root / "afile").write_text("a file\n")
    data = root / "data"
    data.mkdir()
    good = [{"instruction": "Is it?", "input": "", "output": "the correct answer is true", "answer": "true"}] * 4
    (data / "train.json").write_text(json.dumps(good))
    (data / "boolq").mkdir()
    (data / "boolq" / "test.json").write_text(json.dumps(good))
    run(cfg_for(root / "lora_out", adapter="lora", extra=[f"run_name={LORA_RUN}"]))  # PARA's input
    (root / "report.md").write_text(REPORT)
    return root


LORA_RUN = "tiny_encoder__lora__bbc_news__r2__s42"
REPORT = "# Notes\n\nMy words.\n\n<!-- analysis: table1 -->\nold table\n<!-- /analysis -->\n\nMore of my words.\n"


@pytest.fixture
def world(template, tmp_path):
    shutil.copytree(template, tmp_path / "w")
    return tmp_path / "w"


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


# --- the cases -------------------------------------------------------------------------------------------
def harness(*overrides, adapter="lrlora", root="out", backbone="tiny_encoder"):
    return lambda w: run(cfg_for(w / root, backbone, adapter, extra=list(overrides)))


def commonsense(train=None, test=None):
    """A tiny-decoder run on commonsense data; the bad file is written in `prepare`, before the snapshot."""
    def prepare(w):
        d = w / "data"
        if train is not None:
            (d / "train.json").write_text(train)
        if test is not None:
            (d / "boolq" / "test.json").write_text(test)

    def act(w):
        from hydra import compose, initialize_config_dir

        d = w / "data"
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[
                "backbone=tiny_decoder", "regime=commonsense_15k", "adapter=lora", "adapter.r=2", "logger=none",
                "trainer.max_steps=1", "trainer.progress=false", "trainer.num_threads=1", f"paths.root={w / 'out'}",
                f"regime.data_path={d / 'train.json'}", f"regime.eval_dir={d}", "regime.eval_tasks=[boolq]",
                "regime.n_val=1", "regime.train.batch_size=2", "regime.max_length=48"])
        run(cfg)
    return prepare, act


def corrupt(path, data=b"\x00truncated"):
    def act(w):
        run(cfg_for(w / "part", extra=["trainer.max_steps=4", "trainer.save_every=2"]))
    return lambda w: (w / path).write_bytes(data), act


def library(fn):
    return fn


def _model_unchanged(fn, adapter="lora"):
    """Run fn(model, kw); the model must come back identical (names, module types, tensors, grad flags)."""
    def case(w):
        model, kw = tiny(adapter)
        before = [(n, type(m).__name__) for n, m in model.named_modules()]
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            fn(model, kw, w)
        finally:
            assert [(n, type(m).__name__) for n, m in model.named_modules()] == before
            assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
            after = model.state_dict()
            assert sd.keys() == after.keys() and all(torch.equal(sd[k], after[k]) for k in sd)
    return case


def _lrlora_with_other_K(model, kw, w):
    apply_lrlora(model, LRLoRAConfig(**{**kw, "K": 10}))
    load_adapter(model, w / "lrlora_adapter")


def _nan_handle_save(model, kw, w):
    h = apply_adapter(model, name="lora", **kw)
    next(p for p in h.model.parameters() if p.requires_grad).data.fill_(float("nan"))
    h.save(w / "new_adapter")


def _save_handle_to(target, adapter="lora"):
    def case(w):
        model, kw = tiny(adapter)
        apply_adapter(model, name=adapter, **kw).save(w / target)
    return case


def _flip_payload(rel: str):
    """Change one byte of a safetensors file's tensor data, its header intact: the file still parses."""
    def prepare(w):
        p = w / rel
        data = bytearray(p.read_bytes())
        header = int.from_bytes(data[:8], "little")
        data[8 + header] ^= 0x40
        p.write_bytes(bytes(data))
    return prepare


def _busy(w):
    """A second launch of a run while the first holds it."""
    cfg = cfg_for(w / "out", extra=["trainer.force=true"])
    with exclusive_lock(Path(cfg.paths.output_dir), wait=False):
        run(cfg)


def _write_nan_results(w):
    write_results({"run_name": RUN, "metrics": {"glue": {"accuracy": float("nan")}}}, w / "out" / "results")


def _foreign_results(w):
    p = w / "other" / "results"
    p.mkdir(parents=True)
    (p / f"{RUN}.json").write_text(json.dumps({"run_name": RUN, "config": {"seed": 1}}))


def _write(path, data):
    return lambda w: (w / path).write_bytes(data)


GOOD = json.dumps([{"instruction": "Is it?", "input": "", "output": "x", "answer": "true"}])
CASES = [
    # config values: refused before data or backbone load
    ("r=abc", harness("adapter.r=abc"), r"^adapter\.r='abc' must be a positive integer, e\.g\. adapter\.r=8"),
    ("r=0", harness("adapter.r=0"), r"^adapter\.r=0 must be a positive integer"),
    ("r=-2", harness("adapter.r=-2", adapter="lora"), r"^adapter\.r=-2 must be a positive integer"),
    ("r=2.5", harness("adapter.r=2.5", adapter="dylora"), r"^adapter\.r=2\.5 must be a positive integer"),
    ("grad_accum=0", harness("trainer.grad_accum=0"), r"^trainer\.grad_accum=0 must be a positive integer"),
    ("grad_accum=abc", harness("trainer.grad_accum=abc"), r"^trainer\.grad_accum='abc' must be a positive"),
    ("grad_accum>batch", harness("trainer.grad_accum=16"), r"grad_accum=16 exceeds regime\.train\.batch_size=8"),
    ("max_steps=0", harness("trainer.max_steps=0"), r"^trainer\.max_steps=0 must be a positive integer or null"),
    ("eval_every=0", harness("trainer.eval_every=0"), r"^trainer\.eval_every=0 must be"),
    ("log_every=-1", harness("trainer.log_every=-1"), r"^trainer\.log_every=-1 must be a positive integer"),
    ("max_skipped<0", harness("trainer.max_skipped_nonfinite=-1"), r"max_skipped_nonfinite=-1 must be an int"),
    ("precision=fp8", harness("trainer.precision=fp8"), r"^trainer\.precision='fp8' must be one of auto, no"),
    ("lr=0", harness("regime.train.lr=0"), r"^regime\.train\.lr=0 must be a number in \(0, inf\].*trains nothing"),
    ("lr<0", harness("regime.train.lr=-1e-3"), r"^regime\.train\.lr=-0\.001 must be"),
    ("batch_size=0", harness("regime.train.batch_size=0"), r"^regime\.train\.batch_size=0 must be a positive"),
    ("epochs=0", harness("regime.train.epochs=0"), r"^regime\.train\.epochs=0 must be a positive integer"),
    ("schedule", harness("regime.train.schedule=step"), r"^regime\.train\.schedule='step' must be one of"),
    ("metric_mode", harness("regime.train.metric_mode=up"), r"^regime\.train\.metric_mode='up' must be one of"),
    ("warmup_ratio", harness("regime.train.warmup_ratio=1.5"), r"^regime\.train\.warmup_ratio=1\.5 must be"),
    ("n_train=0", harness("regime.n_train=0"), r"^regime\.n_train=0 must be a positive integer or null"),
    ("seed=-1", harness("seed=-1"), r"^seed=-1 must be an integer >= 0"),
    ("adapter.lr=0", harness("+adapter.lr=0", adapter="lora"), r"^adapter\.lr=0 must be a number in \(0"),
    ("dropout=1.5", harness("adapter.dropout=1.5"), r"^adapter\.dropout=1\.5 must be a number in \[0, 1\)"),
    ("K=1", harness("adapter.K=1"), r"^adapter: K must be >= 2"),
    ("basis", harness("adapter.basis=foo"), r"^adapter: unknown basis 'foo'; choose one of sinc"),
    ("metric not measured", harness("regime.train.metric=pearson"),
     r"^regime\.train\.metric='pearson' is not measured for the classification task; choose one of accuracy"),
    ("unknown adapter", harness("adapter.name=foo"), r"^adapter='foo' is unknown; choose one of adalora"),
    # a rank above the layer, for every method (checked on the loaded backbone, before it is modified)
    *[(f"rank>layer {a}", harness("adapter.r=64", adapter=a, root="new"),
       rf"^{a}: r=64 exceeds min\(d_in, d_out\)=32 of '.*' \(32×32\); choose r <= 32 or drop this module")
      for a in ("lrlora", "lora", "dora", "adalora", "randlora", "dylora", "sinelora", "nola", "elalora")],
    ("target module", harness("backbone.target_modules=[nope]", root="new"), r"target module\(s\) \['nope'\] match no nn\.Linear"),
    # data files: named, with the field
    ("data not JSON", commonsense(train="[{oops"), r"train\.json is not valid JSON"),
    ("data empty", commonsense(train="[]"), r"train\.json holds an empty list; it should be a non-empty JSON list"),
    ("data not a list", commonsense(train='{"a": 1}'), r"train\.json holds dict"),
    ("data lacks field", commonsense(train=json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q"}])),
     r"train\.json: example 1 lacks field 'output'"),
    ("test lacks answer", commonsense(test=json.dumps([{"instruction": "q", "output": "a"}])),
     r"boolq/test\.json: example 0 lacks field 'answer'"),
    ("data missing", (lambda w: os.remove(w / "data" / "train.json"), commonsense()[1]),
     r"commonsense_15k training data not found at .*train\.json"),
    # checkpoints: a resumed run reads them all before it writes anything
    ("ckpt weights truncated", corrupt(f"part/runs/{RUN}/checkpoint/model.safetensors"),
     r"checkpoint file .*model\.safetensors is truncated or corrupt .*trainer\.force=true"),
    ("ckpt optimizer truncated", corrupt(f"part/runs/{RUN}/checkpoint/optimizer.bin"),
     r"checkpoint file .*optimizer\.bin is truncated or corrupt"),
    ("ckpt state truncated", corrupt(f"part/runs/{RUN}/checkpoint/custom_checkpoint_1.pkl"),
     r"custom_checkpoint_1\.pkl is truncated or corrupt"),
    ("ckpt meta corrupt", corrupt(f"part/runs/{RUN}/checkpoint/checkpoint.json", b"{"),
     r"checkpoint .* is incomplete or corrupt"),
    ("ckpt of another config", corrupt(f"part/runs/{RUN}/checkpoint/checkpoint.json",
                                       b'{"step": 4, "fingerprint": "other"}'),
     r"checkpoint was written by another configuration; nothing was changed"),
    # run folders and results files of another configuration: refused, whatever the flags
    ("other config", harness("regime.train.lr=0.1"),
     r"holds a run of another configuration \(differs in regime\.train\.lr: 0\.0005 -> 0\.1\); nothing was changed"),
    ("other config, force", harness("regime.train.lr=0.1", "trainer.force=true"), r"another configuration"),
    ("other config, resume=false", harness("regime.train.lr=0.1", "trainer.resume=false"), r"another configuration"),
    ("other data", harness("regime.n_test=4"), r"differs in regime\.n_test: 8 -> 4; the training/evaluation data"),
    ("foreign results", (_foreign_results, lambda w: run(cfg_for(w / "other"))), r"results/.*\.json holds the results of another configuration"),
    ("foreign run folder", (lambda w: shutil.copytree(w / "notes", w / "x" / "runs" / RUN),
                            lambda w: run(cfg_for(w / "x"))),
     r"already holds files that no run of this version wrote"),
    # adapter folders and library calls: typed errors, the model and the disk as they were
    ("load missing folder", _model_unchanged(lambda m, kw, w: load_adapted(m, w / "nope")),
     r"^adapter folder .*nope does not exist"),
    ("load non-adapter", _model_unchanged(lambda m, kw, w: load_adapted(m, w / "notes")),
     r"notes is not an adapter folder written by baselines \(no baselines_meta\.json\)"),
    ("load corrupt meta", (_write("lora_adapter/baselines_meta.json", b"{"),
                           _model_unchanged(lambda m, kw, w: load_adapted(m, w / "lora_adapter"))),
     r"baselines_meta\.json is corrupt"),
    ("load truncated peft", (_write("lora_adapter/adapter_model.safetensors", b"\x00"),
                             _model_unchanged(lambda m, kw, w: load_adapted(m, w / "lora_adapter"))),
     r"adapter_model\.safetensors is (missing or unreadable|corrupt)"),
    ("load truncated lrlora", (_write("lrlora_adapter/adapter_model.safetensors", b"\x00"),
                               _model_unchanged(lambda m, kw, w: load_adapter(m, w / "lrlora_adapter"))),
     r"adapter_model\.safetensors is unreadable or corrupt"),
    ("load truncated self-written", (lambda w: _save_handle_to("sine", "sinelora")(w) or _write(
        "sine/adapter.safetensors", b"\x00")(w), _model_unchanged(lambda m, kw, w: load_adapted(m, w / "sine"))),
     r"adapter\.safetensors is (missing or unreadable|corrupt)"),
    ("load lrlora, other shapes", _model_unchanged(lambda m, kw, w: load_adapter(
        build_backbone(cfg_for(w, "tiny_decoder").backbone, "causal_lm")[0], w / "lrlora_adapter")),
     r"does not fit this model|other module shapes"),
    ("load onto other LR-LoRA", lambda w: _lrlora_with_other_K(*tiny("lrlora"), w),
     r"the model's LR-LoRA layers differ from the adapter in .* in K \(10 vs saved 50\)"),
    ("save into foreign folder", _save_handle_to("notes"),
     r"notes is not empty and was not written as an adapter folder by this code \(it holds todo\.txt\)"),
    ("save into a run folder", _save_handle_to(f"out/runs/{RUN}"), r"is not empty and was not written"),
    ("save onto a file", _save_handle_to("afile"), r"afile is a file, not a folder"),
    ("save into a checkpoint", _save_handle_to(f"out/runs/{RUN}/checkpoint"),
     r"checkpoint is not empty and was not written as an adapter folder by this code"),
    ("save a NaN adapter", lambda w: _nan_handle_save(*tiny("lora"), w),
     r"refusing to save a diverged adapter: .* holds NaN/inf"),
    ("apply: modules_to_save", _model_unchanged(lambda m, kw, w: apply_lrlora(
        m, LRLoRAConfig(**{**kw, "modules_to_save": ["nope"]})), "lrlora"), r"modules_to_save entry 'nope' matches no module"),
    ("apply: r=0", _model_unchanged(lambda m, kw, w: apply_adapter(m, name="lora", **{**kw, "r": 0})),
     r"^lora: r=0 must be a positive integer"),
    ("apply: r too big", _model_unchanged(lambda m, kw, w: apply_adapter(m, name="sinelora", **{**kw, "r": 100})),
     r"^sinelora: r=100 exceeds min\(d_in, d_out\)=32"),
    ("apply: no target", _model_unchanged(lambda m, kw, w: apply_adapter(
        m, name="nola", **{**kw, "target_modules": ["nope"]})), r"^nola: no nn\.Linear matches"),
    ("apply: unknown", _model_unchanged(lambda m, kw, w: apply_adapter(m, name="foo", **kw)),
     r"^unknown adapter 'foo'"),
    ("results NaN", _write_nan_results, r"refusing to write a non-finite value at metrics\.glue\.accuracy"),
    # settings that nothing can use, or nothing reads: refused before data or backbone load
    ("max_length=0", harness("regime.max_length=0"), r"^regime\.max_length=0 must be a positive integer or null"),
    ("num_threads=0", harness("trainer.num_threads=0"), r"^trainer\.num_threads=0 must be a positive integer or auto"),
    ("num_threads=-2", harness("trainer.num_threads=-2"), r"^trainer\.num_threads=-2 must be a positive integer"),
    ("+trainer.max_step=3", harness("+trainer.max_step=3"),
     r"^trainer\.max_step is not a setting of this harness \(did you mean trainer\.max_steps\?\): nothing reads it"),
    ("+regime.train.lrr", harness("+regime.train.lrr=0.1"), r"^regime\.train\.lrr is not a setting of this harness"),
    ("+seeds=3", harness("+seeds=3"), r"^seeds is not a setting of this harness \(did you mean seed\?\)"),
    ("+eval.settings typo", harness("+eval.settings.glue.limt=3"),
     r"^eval\.settings\.glue\.limt is not a setting of protocol glue; its settings: name, limit"),
    ("+eval.settings limit=0", harness("+eval.settings.glue.limit=0"),
     r"^eval\.settings\.glue\.limit=0 must be a positive integer or null"),
    ("protocol does not fit", harness("eval.protocols=[vision]"),
     r"^protocol vision scores image_classification runs, and .* is a classification run \(regime bbc_news\); "
     r"choose protocol=glue"),
    ("protocol unknown", harness("eval.protocols=[nope]"), r"unknown protocol 'nope'"),
    ("layers_to_transform past the last", harness("adapter.layers_to_transform=[5]", root="new"),
     r"layers_to_transform=\[5\] names layer\(s\) \[5\], which hold no matched module: the model's are layers \[0, 1\]"),
    ("test answer empty", commonsense(test=json.dumps([{"instruction": "q", "output": "a", "answer": ""}])),
     r"test example 0 of regime commonsense_15k has an empty 'answer'.*fix the data"),
    ("run launched twice at once", _busy, r"^run .* is already running in another process \(process \d+\); wait for it to finish"),
    # weights whose bytes changed under an intact header: the sha256 recorded when they were written says so
    ("payload: LoRA adapter", (_flip_payload("lora_adapter/adapter_model.safetensors"),
                               _model_unchanged(lambda m, kw, w: load_adapted(m, w / "lora_adapter"))),
     r"lora_adapter/adapter_model\.safetensors is corrupt \(its sha256 differs from the one recorded"),
    ("payload: LR-LoRA library", (_flip_payload("lrlora_adapter/adapter_model.safetensors"),
                                  _model_unchanged(lambda m, kw, w: load_adapter(m, w / "lrlora_adapter"), "lrlora")),
     r"adapter_model\.safetensors is unreadable or corrupt \(its sha256 differs"),
    ("payload: LR-LoRA run", (_flip_payload("lrlora_run_adapter/adapter_model.safetensors"),
                              _model_unchanged(lambda m, kw, w: load_adapted(m, w / "lrlora_run_adapter"), "lrlora")),
     r"adapter_model\.safetensors is corrupt \(its sha256 differs"),
    ("payload: checkpoint", (_flip_payload(f"part/runs/{RUN}/checkpoint/model.safetensors"), corrupt("x")[1]),
     r"checkpoint file .*model\.safetensors is truncated or corrupt \(its sha256 differs"),
]


@pytest.mark.parametrize("case, fault, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(world, case, fault, message):
    if isinstance(fault, tuple):  # (put the fault in place, then act): the snapshot is taken in between
        prepare, fault = fault
        prepare(world)
    before = snapshot(world)
    with pytest.raises(UserError) as info:
        fault(world)
    text = str(info.value)
    assert "\n" not in text, text
    assert re.search(message, text), text
    assert snapshot(world) == before, "a refused input changed files on disk"


def test_the_tables_have_their_cases():
    assert len(CASES) >= 80 and len({c[0] for c in CASES}) == len(CASES)
    assert len(CLI_CASES) >= 90 and len({c[1] for c in CLI_CASES}) == len(CLI_CASES)
    assert {c[2] for c in CLI_CASES} == set(ENTRIES), "every entry point has its cases"


# --- every entry point's command line: exit status 2 and one `error:` line; nothing on disk changes -----------
# entry point -> (its module, its Hydra config or None for argparse); called in this process through lrlora.cli (experiments.hydra_cli for Hydra)
# exactly as `python -m <entry point>` calls it (the slow test below runs them as processes).
ENTRIES = {
    "experiments.train": ("experiments.train", "train"),
    "experiments.evaluate": ("experiments.evaluate", "evaluate"),
    "experiments.para": ("experiments.para", "para"),
    "experiments.demo": ("experiments.demo", None),
    "experiments.clean": ("experiments.clean", None),
    "experiments.commonsense_suite": ("experiments.commonsense_suite", None),
    "analysis": ("analysis.__main__", None),
    "analysis.reproduce": ("analysis.reproduce", None),
    "analysis.report": ("analysis.report", None),
    "lrlora.peft": ("lrlora.peft", None),
    "benchmarks.report": ("benchmarks.report", None),
    "benchmarks.sigma_op": ("benchmarks.sigma_op", None),
    "benchmarks.sigma_op_breakdown": ("benchmarks.sigma_op_breakdown", None),
    "benchmarks.train_step": ("benchmarks.train_step", None),
    "benchmarks.workload": ("benchmarks.workload", None),
    "benchmarks.gpu_check": ("benchmarks.gpu_check", None),
    "scripts.cache_smollm2": ("scripts.cache_smollm2", None),
    "scripts.extract_paper_values": ("scripts.extract_paper_values", None),
    "scripts.make_commonsense_bb": ("scripts.make_commonsense_bb", None),
    "scripts.para_bbc": ("scripts.para_bbc", None),
    "scripts.reproduction_pilot": ("scripts.reproduction_pilot", None),
}
CONF = REPO / "conf"


def test_the_method_library_never_imports_the_harness_or_its_frameworks():
    """lrlora/ is usable with torch alone: the Hydra side of the error convention is experiments/hydra_cli.py."""
    import ast

    banned = {"hydra", "omegaconf", "experiments", "analysis", "baselines"}
    found = []
    for path in sorted((REPO / "lrlora").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in banned]
    assert not found, found


def call_entry(entry: str, argv: list[str]) -> int:
    module, config = ENTRIES[entry]
    mod = importlib.import_module(module)
    if config:
        return hydra_cli.call_hydra(mod.main, CONF, config, argv)
    return cli.call(mod.main, argv)


def argv_in(world: Path, argv) -> list[str]:
    """`@x` is world/x; in `key=@x`, the value."""
    def one(a):
        key, sep, value = a.partition("=@")
        if sep:
            return f"{key}={world / value}"
        return str(world / a[1:]) if a.startswith("@") else a
    return [one(a) for a in argv]


def _edit_json(rel, fn):
    def prepare(w):
        p = w / rel
        d = json.loads(p.read_text())
        fn(d)
        p.write_text(json.dumps(d))
    return prepare


def _put(rel, text):
    def prepare(w):
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_text(text)
    return prepare


def _report(text):
    return _put("report.md", text)


def _duplicate(w):
    """A second results file claiming the run, with another accuracy."""
    d = json.loads((w / "out" / "results" / f"{RUN}.json").read_text())
    d["metrics"]["glue"]["accuracy"] = 0.99
    (w / "dup").mkdir()
    (w / "dup" / f"{RUN}.json").write_text(json.dumps(d))


RES = f"out/results/{RUN}.json"
LORA_RES = f"lora_out/results/{LORA_RUN}.json"
EV = [f"run=@out/runs/{RUN}", "protocol=glue"]
PA = ["adapter_dir=@lora_adapter", "out=@p"]
AN = ["--results", "@out/results", "--out", "@tables"]
NEW = ["backbone=tiny_encoder", "logger=none", "paths.root=@new"]
BLOCK = "<!-- analysis: table1 -->\nold table\n"
# (family, case, entry point, argv, put the fault in place (or None), the one line on stderr)
CLI_CASES = [
    # Hydra's own errors, worded as one line with the fix
    ("hydra", "train: misspelled key", "experiments.train", ["trainer.max_step=3", *NEW],
     None, r"^error: trainer\.max_step is not a setting of this command; did you mean trainer\.max_steps\? unknown "
           r"settings are refused"),
    ("hydra", "train: unknown option", "experiments.train", ["--foo"], None, r"^error: unrecognized arguments: --foo"),
    ("hydra", "train: override without =", "experiments.train", ["adapter.r"], None,
     r"^error: cannot parse the override 'adapter\.r' \(missing EQUAL"),
    ("hydra", "train: unknown group option", "experiments.train", ["adapter=foo"], None,
     r"^error: adapter=foo is not an option of adapter; choose one of adalora, dora"),
    ("hydra", "train: group given twice", "experiments.train", ["+adapter=lora"], None, r"^error: adapter is given twice"),
    ("hydra", "train: unclosed list", "experiments.train", ["adapter.target_modules=[q"], None,
     r"^error: cannot parse the override"),
    ("hydra", "train: missing interpolation", "experiments.train", ["regime.train.lr=${nope}", *NEW], None,
     r"^error: .*nope.*\(at regime\.train\.lr\)"),
    ("hydra", "train: run_name holding =", "experiments.train", ["run_name=mine__a=b", "adapter.r=0", *NEW], None,
     r"^error: adapter\.r=0 must be a positive integer"),  # the name parses: the next check speaks
    ("hydra", "evaluate: misspelled key", "experiments.evaluate", [*EV, "batchsize=4"], None,
     r"^error: batchsize is not a setting of this command; did you mean batch_size\?"),
    ("hydra", "evaluate: unknown protocol", "experiments.evaluate", [EV[0], "protocol=nope"], None,
     r"^error: protocol=nope is not an option of protocol; choose one of commonsense_gen, glue"),
    ("hydra", "evaluate: no protocol", "experiments.evaluate", [EV[0]], None, r"^error: .*protocol"),
    ("hydra", "para: misspelled key", "experiments.para", [*PA, "para.keep_energi=0.9"], None,
     r"^error: para\.keep_energi is not a setting of this command; did you mean para\.keep_energy\?"),
    # settings nothing reads, added with + (Hydra's suggested fix for a typo): refused, not ignored
    ("unknown key", "train: +trainer.max_step", "experiments.train", ["+trainer.max_step=3", *NEW], None,
     r"^error: trainer\.max_step is not a setting of this harness \(did you mean trainer\.max_steps\?\)"),
    ("unknown key", "train: +regime.max_len", "experiments.train", ["+regime.max_len=3", *NEW], None,
     r"^error: regime\.max_len is not a setting of this harness \(did you mean regime\.max_length\?\)"),
    ("unknown key", "evaluate: +protocol.limt", "experiments.evaluate", [*EV, "+protocol.limt=3"], None,
     r"^error: protocol\.limt is not a setting of protocol glue; its settings: name, limit"),
    ("unknown key", "evaluate: +batchsize", "experiments.evaluate", [*EV, "+batchsize=3"], None,
     r"^error: batchsize is not a setting of this command: nothing reads it"),
    ("unknown key", "para: +para.keep=0.9", "experiments.para", [*PA, "+para.keep=0.9"], None,
     r"^error: para\.keep is not a setting of this command"),
    # settings: checked before anything is read or written (an impossible one never reaches a results file)
    ("settings", "train: r=abc", "experiments.train", ["adapter.r=abc", *NEW], None,
     r"^error: adapter\.r='abc' must be a positive integer, e\.g\. adapter\.r=8 \(lrlora\)$"),
    ("settings", "train: num_threads=0", "experiments.train", ["trainer.num_threads=0", *NEW], None,
     r"^error: trainer\.num_threads=0 must be a positive integer or auto"),
    ("settings", "train: max_length=0", "experiments.train", ["regime.max_length=0", *NEW], None,
     r"^error: regime\.max_length=0 must be a positive integer or null"),
    ("false result", "evaluate: batch_size=-2", "experiments.evaluate", [*EV, "batch_size=-2"], None,
     r"^error: batch_size=-2 must be a positive integer, or null for the default$"),
    ("false result", "evaluate: batch_size=0", "experiments.evaluate", [*EV, "batch_size=0"], None,
     r"^error: batch_size=0 must be a positive integer"),
    ("settings", "evaluate: batch_size=abc", "experiments.evaluate", [*EV, "batch_size=abc"], None,
     r"^error: batch_size='abc' must be a positive integer"),
    ("false result", "evaluate: protocol.limit=0", "experiments.evaluate", [*EV, "protocol.limit=0"], None,
     r"^error: protocol\.limit=0 must be a positive integer or null$"),
    ("settings", "evaluate: protocol.limit=-1", "experiments.evaluate", [*EV, "protocol.limit=-1"], None,
     r"^error: protocol\.limit=-1 must be"),
    ("settings", "evaluate: unknown device", "experiments.evaluate", [*EV, "device=foo"], None,
     r"^error: device='foo' is not a device: use auto, cpu, cuda, cuda:N or mps$"),
    ("settings", "evaluate: absent GPU", "experiments.evaluate", [*EV, "device=cuda:99"], None,
     r"^error: device=cuda:99 but torch sees \d+ GPU\(s\); use device=cpu or device=auto$"),
    ("settings", "evaluate: num_threads=0", "experiments.evaluate", [*EV, "num_threads=0"], None,
     r"^error: num_threads=0 must be a positive integer"),
    ("settings", "evaluate: no run=", "experiments.evaluate", ["protocol=glue"], None,
     r"^error: run= is required: pass run=<run folder>"),
    ("settings", "para: keep-energy 1.5", "experiments.para", [*PA, "para.keep_energy=1.5"], None,
     r"^error: para\.keep_energy must be in \(0, 1\], got 1\.5"),
    ("settings", "para: keep-energy 0", "experiments.para", [*PA, "para.keep_energy=0"], None,
     r"^error: para\.keep_energy must be in \(0, 1\]"),
    ("settings", "para: reduction 1", "experiments.para", [*PA, "para.reduction=1"], None,
     r"^error: para\.reduction must be in \[0, 1\), got 1"),
    ("settings", "para: reduction < 0", "experiments.para", [*PA, "para.reduction=-0.1"], None,
     r"^error: para\.reduction must be in \[0, 1\)"),
    ("settings", "para: two thresholds", "experiments.para", [*PA, "para.reduction=0.5", "para.keep_energy=0.9"],
     None, r"^error: give exactly one of para\.keep_energy or para\.reduction$"),
    ("settings", "para: no threshold", "experiments.para", PA, None, r"^error: give exactly one of"),
    ("settings", "para: run and adapter_dir", "experiments.para", [*PA, f"run={RUN}", "para.keep_energy=0.9"], None,
     r"^error: pass run=RUN .* or adapter_dir=DIR out=DIR .*: exactly one of the two$"),
    ("settings", "para: neither run nor adapter_dir", "experiments.para", ["para.keep_energy=0.9"], None,
     r"exactly one of the two"),
    ("settings", "para: adapter_dir without out", "experiments.para", [PA[0], "para.keep_energy=0.9"], None,
     r"^error: adapter_dir=DIR needs out=DIR"),
    ("settings", "para: run with out", "experiments.para", [f"run=@lora_out/runs/{LORA_RUN}", "out=@p",
                                                            "para.keep_energy=0.9"], None,
     r"^error: out= goes with adapter_dir=DIR"),
    ("settings", "para: num_labels=0", "experiments.para", [*PA, "para.keep_energy=0.9", "num_labels=0"], None,
     r"^error: num_labels=0 must be a positive integer or null$"),
    ("false result", "para: batch_size=-1", "experiments.para", [f"run=@lora_out/runs/{LORA_RUN}",
                                                                "para.keep_energy=0.9", "batch_size=-1"], None,
     r"^error: batch_size=-1 must be a positive integer"),
    ("settings", "para: unknown device", "experiments.para", [f"run=@lora_out/runs/{LORA_RUN}", "para.keep_energy=0.9",
                                                              "device=tpu"], None, r"^error: device='tpu' is not a device"),
    # a protocol that does not fit the run: before anything loads
    ("fit", "train: protocol vision on text", "experiments.train", ["eval.protocols=[vision]", *NEW], None,
     r"^error: protocol vision scores image_classification runs, and .* is a classification run"),
    ("fit", "evaluate: protocol vision on text", "experiments.evaluate", [EV[0], "protocol=vision"], None,
     r"^error: protocol vision scores image_classification runs, and .* is a classification run \(regime "
     r"bbc_news\); choose protocol=glue$"),
    ("fit", "evaluate: generation on a classifier", "experiments.evaluate", [EV[0], "protocol=commonsense_gen"],
     None, r"^error: protocol commonsense_gen scores causal_lm runs"),
    ("fit", "evaluate: lm_eval on a classifier", "experiments.evaluate", [EV[0], "protocol=lm_eval"],
     None, r"^error: protocol lm_eval scores causal_lm runs"),
    ("fit", "para: an LR-LoRA run", "experiments.para", [f"run=@out/runs/{RUN}", "para.keep_energy=0.9"], None,
     r"^error: run '.*' trained a 'lrlora' adapter: PARA through the harness takes a plain LoRA run; for others use "
     r"python -m experiments\.para adapter_dir="),
    # the run named, its results file and its adapter: missing, truncated, corrupt, or not under the root chosen
    ("missing or corrupt", "evaluate: no such run", "experiments.evaluate", ["run=nope", "paths.root=@out",
                                                                             "protocol=glue"], None,
     r"^error: no results file for run 'nope'"),
    ("missing or corrupt", "evaluate: printed name with =", "experiments.evaluate",
     ["run=tiny__center=true__basis=gaussian", "paths.root=@out", "protocol=glue"], None,
     r"^error: no results file for run 'tiny__center=true__basis=gaussian'"),  # parsed as printed
    ("missing or corrupt", "evaluate: truncated results file", "experiments.evaluate", EV, _put(RES, '{"run_name'),
     r"^error: .*\.json is truncated or not JSON .*; restore it from a copy or re-run that run"),
    ("missing or corrupt", "evaluate: results file of another run", "experiments.evaluate",
     ["run=@out/results/other.json", "protocol=glue"],
     lambda w: shutil.copy(w / RES, w / "out" / "results" / "other.json"), r"^error: .*other\.json holds run"),
    ("missing or corrupt", "evaluate: adapter gone", "experiments.evaluate", EV,
     lambda w: shutil.rmtree(w / "out" / "runs" / RUN / "adapter"), r"^error: the run's adapter is not at .*/out/runs/"),
    ("missing or corrupt", "evaluate: corrupt adapter payload", "experiments.evaluate", EV,
     _flip_payload(f"out/runs/{RUN}/adapter/adapter_model.safetensors"),
     r"^error: .*adapter_model\.safetensors is corrupt \(its sha256 differs"),
    ("missing or corrupt", "para: truncated results file", "experiments.para",
     [f"run=@lora_out/runs/{LORA_RUN}", "para.keep_energy=0.9"], _put(LORA_RES, "{"),
     r"^error: .*\.json is truncated or not JSON"),
    ("missing or corrupt", "para: no such run", "experiments.para", ["run=nope", "paths.root=@lora_out",
                                                                     "para.keep_energy=0.9"], None,
     r"^error: no results file for run 'nope'"),
    ("missing or corrupt", "para: missing adapter", "experiments.para", ["adapter_dir=@nope", "out=@p",
                                                                         "para.keep_energy=0.9"], None,
     r"^error: adapter_dir=.*nope does not exist"),
    ("missing or corrupt", "para: not an adapter", "experiments.para", ["adapter_dir=@notes", "out=@p",
                                                                        "para.keep_energy=0.9"], None,
     r"^error: .*notes is not an adapter folder"),
    ("missing or corrupt", "para: LR-LoRA without its base", "experiments.para",
     ["adapter_dir=@lrlora_run_adapter", "out=@p", "para.keep_energy=0.9"], None,
     r"^error: .* holds a 'lrlora' adapter, not a plain LoRA: pass base_model=PATH"),
    ("missing or corrupt", "para: base model missing", "experiments.para",
     ["adapter_dir=@lrlora_run_adapter", "out=@p", "para.keep_energy=0.9", "base_model=@nope"], None,
     r"^error: base_model=.*nope could not be loaded"),
    ("missing or corrupt", "para: corrupt adapter payload", "experiments.para", [*PA, "para.keep_energy=0.9"],
     _flip_payload("lora_adapter/adapter_model.safetensors"), r"^error: .*adapter_model\.safetensors is corrupt"),
    ("missing or corrupt", "peft: missing folder", "lrlora.peft", ["to-peft", "@nope", "@x"], None,
     r"^error: adapter folder .*nope does not exist"),
    ("missing or corrupt", "peft: not LR-LoRA", "lrlora.peft", ["to-library", "@lora_adapter", "@x"], None,
     r"^error: .*lora_adapter holds a 'LORA' adapter, not an LR-LoRA one"),
    ("missing or corrupt", "peft: PEFT folder as library", "lrlora.peft", ["to-peft", "@lrlora_run_adapter", "@x"],
     None, r"^error: .*adapter_config\.json has format None, expected 'lrlora-adapter/1': not an LR-LoRA adapter"),
    ("missing or corrupt", "peft: corrupt payload", "lrlora.peft", ["to-library", "@lrlora_run_adapter", "@x"],
     _flip_payload("lrlora_run_adapter/adapter_model.safetensors"), r"^error: .* is corrupt \(its sha256 differs"),
    ("missing or corrupt", "analysis: no results folder", "analysis", ["table1", "--results", "@nope", "--out",
                                                                       "@tables"], None,
     r"^error: .*nope: no such results folder"),
    ("missing or corrupt", "analysis: truncated results file", "analysis", ["table1", *AN],
     _put("out/results/cut.json", '{"run_name": "x", "met'), r"^error: .*cut\.json: not a readable results file"),
    ("missing or corrupt", "analysis: a run folder missing", "analysis",
     ["fig_landscape", "--run", "@nope", "--out", "@tables"], None, r"^error: --run .*nope: needs the run's adapter"),
    ("missing or corrupt", "report: no report", "analysis.report", ["@nope.md", "--results", "@out/results"], None,
     r"^error: no report at .*nope\.md"),
    ("missing or corrupt", "benchmarks: not a results file", "benchmarks.report", ["--train", "@afile"], None,
     r"^error: .*afile is not a benchmark results file"),
    ("missing or corrupt", "scripts: no pilot results", "scripts.reproduction_pilot", ["--results", "@notes"], None,
     r"^error: no pilot results \(tag repro_pilot\) in .*notes"),
    ("missing or corrupt", "scripts: no paper text", "scripts.extract_paper_values", ["@nope.txt"], None,
     r"^error: no paper text at .*nope\.txt"),
    # results that would be false: data changed since training, two files for one run
    ("false result", "evaluate: data changed since training", "experiments.evaluate", EV,
     _edit_json(RES, lambda d: d.update(data_fingerprint="0" * 64)),
     r"^error: the data of regime bbc_news .* is not the data run .* was trained and tested on \(its fingerprint "
     r"differs\): nothing was scored"),
    ("false result", "evaluate: no data fingerprint recorded", "experiments.evaluate", EV,
     lambda w: (_edit_json(RES, lambda d: d.pop("data_fingerprint"))(w),
                _edit_json(f"out/runs/{RUN}/run.json", lambda d: d.pop("data"))(w)),
     r"^error: .* records no data fingerprint, and .*run\.json is missing or unreadable"),
    ("false result", "para: data changed since training", "experiments.para",
     [f"run=@lora_out/runs/{LORA_RUN}", "para.keep_energy=0.9"],
     _edit_json(LORA_RES, lambda d: d.update(data_fingerprint="0" * 64)), r"^error: the data of regime bbc_news"),
    ("false result", "analysis: one run, two results", "analysis", ["table1", "--results", "@out/results", "@dup",
                                                                    "--out", "@tables"], _duplicate,
     r"^error: .* and .* both claim run '.*' with different numbers \(metrics\.glue\.accuracy\); keep the one you "
     r"mean"),
    # paths a results file records: only ever under the root the user chose
    ("data loss", "evaluate: adapter recorded outside the root", "experiments.evaluate", EV,
     _edit_json(RES, lambda d: d.update(adapter_dir="/elsewhere/adapter")),
     r"^error: .* records '/elsewhere/adapter', which is not runs/.*/adapter; nothing was read or written"),
    ("data loss", "evaluate: adapter recorded as another run's", "experiments.evaluate", EV,
     _edit_json(RES, lambda d: d.update(adapter_dir=f"runs/{LORA_RUN}/adapter")), r"which is not runs/"),
    ("data loss", "para: adapter recorded outside the root", "experiments.para",
     [f"run=@lora_out/runs/{LORA_RUN}", "para.keep_energy=0.9"],
     _edit_json(LORA_RES, lambda d: d.update(adapter_dir="../../x/adapter")), r"^error: .* records '\.\./\.\./x"),
    # writes that would replace what this code did not write
    ("data loss", "para: out = input", "experiments.para", ["adapter_dir=@lora_adapter", "out=@lora_adapter",
                                                           "para.keep_energy=0.9"], None,
     r"^error: out=.* is, contains or lies inside the input adapter_dir=.*: PARA never writes into its own input"),
    ("data loss", "para: out inside input", "experiments.para", ["adapter_dir=@lora_adapter", "out=@lora_adapter/sub",
                                                                "para.keep_energy=0.9"], None, r"lies inside the input"),
    ("data loss", "para: out contains input", "experiments.para", ["adapter_dir=@lora_adapter", "out=@.",
                                                                  "para.keep_energy=0.9"], None, r"lies inside the input"),
    ("data loss", "para: out foreign", "experiments.para", ["adapter_dir=@lora_adapter", "out=@notes",
                                                           "para.keep_energy=0.9"], None,
     r"^error: .*notes is not empty and was not written as a PARA adapter folder"),
    ("data loss", "para: out = a trained adapter", "experiments.para", ["adapter_dir=@lora_adapter",
                                                                       "out=@lrlora_adapter", "para.keep_energy=0.9"],
     None, r"^error: .*lrlora_adapter is not empty and was not written as a PARA adapter folder"),
    ("data loss", "peft: into a foreign folder", "lrlora.peft", ["to-library", "@lrlora_run_adapter", "@notes"], None,
     r"^error: .*notes is not empty and was not written as a folder by this code \(it holds todo\.txt\)"),
    ("data loss", "peft: onto a file", "lrlora.peft", ["to-peft", "@lrlora_adapter", "@afile"], None,
     r"^error: .*afile is a file, not a folder"),
    ("data loss", "analysis: --out over a user's table", "analysis", ["table1", *AN],
     _put("tables/table1.md", "my own table\n"),
     r"^error: .*tables/table1\.md exists and was not written by this code; nothing was written"),
    ("data loss", "analysis: --out over an edited table", "analysis", ["table1", *AN],
     lambda w: (call_entry("analysis", argv_in(w, ["table1", *AN])), (w / "tables" / "table1.csv").write_text("x\n")),
     r"^error: .*tables/table1\.csv exists and was changed since this code wrote it"),
    ("leftover", "analysis: --out = the results folder", "analysis", ["table1", "--results", "@out/results",
                                                                      "--out", "@out/results"], None,
     r"^error: --out .*out/results is a folder of results files \(or inside one\)"),
    ("leftover", "analysis: --out inside the results folder", "analysis",
     ["table1", "--results", "@out/results", "--out", "@out/results/tables"], None, r"is a folder of results files"),
    ("leftover", "analysis: --out at another results folder", "analysis",
     ["table1", "--results", "@out/results", "--out", "@lora_out/results"], None, r"is a folder of results files"),
    # a report whose block markers are damaged: an error line, and not a byte of the report changes
    ("report marker", "report: damaged closing marker", "analysis.report", ["@report.md", "--results", "@out/results"],
     _report(f"# Notes\n\n{BLOCK}<!-- /analysis ->\n\nMy words.\n\n<!-- analysis: table1 -->\n<!-- /analysis -->\n"),
     r"^error: .*report\.md:5: '<!-- /analysis ->' looks like a damaged block marker: fix it to"),
    ("report marker", "report: damaged opening marker", "analysis.report", ["@report.md", "--results", "@out/results"],
     _report("# Notes\n\n<!-- analysis:table1-->\nold\n<!-- /analysis -->\n"),
     r"^error: .*report\.md:3: '<!-- analysis:table1-->' looks like a damaged block marker"),
    ("report marker", "report: block never closed", "analysis.report", ["@report.md", "--results", "@out/results"],
     _report(f"# Notes\n\n{BLOCK}\nMy words.\n"), r"^error: .*report\.md:3: block 'table1' is never closed"),
    ("report marker", "report: close without open", "analysis.report", ["@report.md", "--results", "@out/results"],
     _report("# Notes\n\nold\n<!-- /analysis -->\n"), r"^error: .*report\.md:4: <!-- /analysis --> closes no block"),
    ("report marker", "report: block inside a block", "analysis.report", ["@report.md", "--results", "@out/results"],
     _report(f"{BLOCK}{BLOCK}<!-- /analysis -->\n"), r"^error: .*report\.md:3: block 'table1' opens before block"),
    ("report marker", "report: --check on a damaged marker", "analysis.report",
     ["@report.md", "--check", "--results", "@out/results"], _report(f"{BLOCK}<!-- /analysis --\n"),
     r"looks like a damaged block marker"),
    ("report marker", "report: no block", "analysis.report", ["@report.md", "--results", "@out/results"],
     _report("just words\n"), r"^error: .*report\.md has no generated block"),
    ("report marker", "report: a block of no table", "analysis.report", ["@report.md", "--results", "@out/results"],
     _report("<!-- analysis: no_such_target -->\n<!-- /analysis -->\n"),
     r"^error: report block 'no_such_target' is not a table target"),
    # command lines: unknown options and values, one line each
    ("usage", "analysis: unknown target", "analysis", ["nosuch", *AN], None,
     r"^error: unknown target 'nosuch'; choose one of"),
    ("usage", "analysis: unknown option", "analysis", ["tables", "--bogus"], None,
     r"^error: python -m analysis: unrecognized arguments: --bogus \(see python -m analysis --help\)$"),
    ("usage", "analysis: needs --run", "analysis", ["fig_landscape", *AN], None,
     r"^error: fig_landscape is built from one run folder: pass --run"),
    ("usage", "report: unknown option", "analysis.report", ["--bogus"], None, r"^error: .*unrecognized arguments"),
    ("usage", "reproduce: unknown table", "analysis.reproduce", ["nosuch", "--dry-run", "--root", "@r"], None,
     r"^error: no grid for 'nosuch' in analysis/scales\.yaml"),
    ("usage", "reproduce: unknown scale", "analysis.reproduce", ["table1", "--scale", "huge", "--dry-run",
                                                                 "--root", "@r"], None,
     r"^error: unknown scale 'huge'"),
    ("usage", "reproduce: bad shard", "analysis.reproduce", ["reproduction", "--shard", "3/2", "--dry-run",
                                                             "--root", "@r"], None,
     r"^error: --shard '3/2': I must be between 1 and N"),
    ("usage", "reproduce: an option abbreviated", "analysis.reproduce", ["table1", "--seed", "1", "--dry-run",
                                                                         "--root", "@r"], None,
     r"^error: python -m analysis\.reproduce: unrecognized arguments"),
    ("usage", "peft: missing arguments", "lrlora.peft", ["to-peft"], None,
     r"^error: python -m lrlora\.peft to-peft: the following arguments are required: src, out"),
    ("usage", "peft: unknown command", "lrlora.peft", ["convert", "@a", "@b"], None, r"^error: .*invalid choice"),
    ("usage", "demo: unknown option", "experiments.demo", ["--bogus"], None, r"^error: python -m experiments\.demo: "),
    ("usage", "demo: bad override", "experiments.demo", ["--out", "@demo", "adapter.r=abc"], None,
     r"^error: adapter\.r='abc' must be a positive integer"),
    ("usage", "demo: misspelled key", "experiments.demo", ["--out", "@demo", "trainer.max_step=1"], None,
     r"^error: trainer\.max_step is not a setting of this command"),
    ("usage", "clean: root is a file", "experiments.clean", ["--root", "@afile"], None,
     r"^error: --root .*afile is a file, not an outputs folder$"),
    ("usage", "clean: unknown option", "experiments.clean", ["--all"], None, r"^error: .*unrecognized arguments"),
    ("usage", "suite: unknown option", "experiments.commonsense_suite", ["--bogus"], None, r"^error: .*unrecognized"),
    ("usage", "benchmarks: unknown option", "benchmarks.report", ["--bogus"], None, r"^error: .*unrecognized"),
    ("usage", "benchmarks: bad model", "benchmarks.train_step", ["--models", "foo:2", "--out", "@b.json"], None,
     r"^error: --models 'foo:2': use MODEL:LAYERS with MODEL one of"),
    ("usage", "benchmarks: bad tokens", "benchmarks.train_step", ["--tokens", "100", "--out", "@b.json"], None,
     r"^error: --tokens 100 is not a multiple of the sequence length"),
    ("usage", "benchmarks: unknown path", "benchmarks.sigma_op", ["--paths", "nope"], None, r"^error: .*invalid choice"),
    ("usage", "benchmarks: bad repeats", "benchmarks.sigma_op_breakdown", ["--repeats", "x"], None,
     r"^error: .*invalid int value: 'x'"),
    ("usage", "benchmarks: unknown option (workload)", "benchmarks.workload", ["--bogus"], None,
     r"^error: python -m benchmarks\.workload: unrecognized arguments: --bogus"),
    ("usage", "benchmarks: unknown option (gpu_check)", "benchmarks.gpu_check", ["--bogus"], None,
     r"^error: python -m benchmarks\.gpu_check: unrecognized arguments: --bogus"),
    ("usage", "scripts: unknown option (cache)", "scripts.cache_smollm2", ["--bogus"], None, r"^error: .*unrecognized"),
    ("usage", "scripts: unknown option (suite)", "scripts.make_commonsense_bb", ["--bogus"], None,
     r"^error: .*unrecognized"),
    ("usage", "scripts: unknown option (para_bbc)", "scripts.para_bbc", ["--bogus"], None, r"^error: .*unrecognized"),
    ("usage", "scripts: missing argument", "scripts.extract_paper_values", [], None,
     r"^error: .*the following arguments are required: paper"),
]


@pytest.mark.parametrize("family, case, entry, argv, prepare, message", CLI_CASES, ids=[c[1] for c in CLI_CASES])
def test_entry_point_user_error_is_one_line_exit_2_and_changes_nothing(world, family, case, entry, argv, prepare,
                                                                         message, capsys):
    if prepare:
        prepare(world)
    capsys.readouterr()
    before = snapshot(world)
    code = call_entry(entry, argv_in(world, argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]
    assert snapshot(world) == before, "a refused command changed files on disk"


def _disk_refuses(code):
    @contextmanager
    def refuse(path):
        raise OSError(code, os.strerror(code), str(path))
        yield  # pragma: no cover
    return refuse


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "No space left on device; free some space"),
                                         (errno.EROFS, "Read-only file system; that file system is read-only")])
@pytest.mark.parametrize("entry, argv", [("analysis", ["table1", *AN]), ("experiments.evaluate", EV),
                                         ("experiments.train", NEW)], ids=["analysis", "evaluate", "train"])
def test_a_disk_that_refuses_the_write_is_one_line(world, monkeypatch, capsys, code, words, entry, argv):
    """A full or read-only disk: one line naming the file and what to do, exit 2, and nothing left behind."""
    monkeypatch.setattr("lrlora._atomic.atomic_file", _disk_refuses(code))
    before = snapshot(world)
    assert call_entry(entry, argv_in(world, argv)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "warn" not in line.lower()]
    assert len(lines) == 1 and re.match(rf"^error: cannot write .*: {words}", lines[-1]), lines
    assert snapshot(world) == before


def test_an_internal_failure_keeps_its_traceback_and_exits_1(tmp_path):
    """Not a user error: the traceback is the report (exit 1), never an `error:` line that hides it."""
    def crash(argv=None):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        cli.call(crash, [])
    p = subprocess.run([sys.executable, "-c", "from lrlora import cli; cli.run(lambda: 1 / 0)"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert p.returncode == 1 and "Traceback" in p.stderr and "ZeroDivisionError" in p.stderr


def test_bad_arguments_as_processes_exit_2_with_one_line(tmp_path):
    """The same convention through `python -m`, for the main commands (the slow test runs every entry point)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for entry, argv in (("experiments.train", ["adapter.r=abc", "logger=none", f"paths.root={tmp_path}"]),
                        ("experiments.evaluate", [f"run={tmp_path}/nope", "protocol=glue"]),
                        ("analysis", ["tables", "--bogus"])):
        p = subprocess.run([sys.executable, "-m", entry, *argv], capture_output=True, text=True, cwd=REPO,
                           timeout=300, env=env)
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (entry, p.stderr)
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "a refused run leaves no folder"


@pytest.mark.slow
@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_every_entry_point_as_a_process(entry, world):
    """Each entry point's first table case, run as `python -m <entry point>`: exit 2, its one `error:` line."""
    family, case, _, argv, prepare, message = next(c for c in CLI_CASES if c[2] == entry and c[4] is None)
    before = snapshot(world)
    p = subprocess.run([sys.executable, "-m", entry, *argv_in(world, argv)], capture_output=True, text=True,
                       cwd=REPO, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in p.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
    assert p.returncode == 2 and len(lines) == 1 and re.search(message, lines[0]), (case, p.stderr)
    assert snapshot(world) == before


# --- nothing lost: a copied outputs folder is re-scored and compressed in the copy alone ----------------------
def _tree(world: Path, top: str) -> dict:
    return {k: v for k, v in snapshot(world).items() if k == top or k.startswith(top + "/")}


def test_rescoring_and_compressing_a_copy_write_only_into_the_copy(world, capsys):
    """`run=COPY/runs/X` and `paths.root=COPY`: the copy's results file, run folder and PARA run change; the
    original not by a byte, also when the copy's results files record the original's absolute paths (as results
    files did before paths were relative to their root); and a copy stands alone (its original moved away)."""
    shutil.copytree(world / "out", world / "copy")
    shutil.copytree(world / "lora_out", world / "lora_copy")
    _edit_json(f"copy/results/{RUN}.json",
               lambda d: d.update(adapter_dir=str(world / "out" / "runs" / RUN / "adapter")))(world)
    _edit_json(f"lora_copy/results/{LORA_RUN}.json",
               lambda d: d.update(adapter_dir=str(world / "lora_out" / "runs" / LORA_RUN / "adapter")))(world)
    originals = {top: _tree(world, top) for top in ("out", "lora_out")}
    assert call_entry("experiments.para", [f"run={LORA_RUN}", f"paths.root={world / 'lora_copy'}",
                                           "para.keep_energy=0.9"]) == 0
    assert call_entry("experiments.evaluate", [f"run={world / 'copy' / 'runs' / RUN}", "protocol=glue"]) == 0
    assert {top: _tree(world, top) for top in originals} == originals, "the original outputs folder changed"
    (world / "out").rename(world / "moved")  # the original gone: the copy is re-scored from itself
    assert call_entry("experiments.evaluate", [f"run={RUN}", f"paths.root={world / 'copy'}", "protocol=glue"]) == 0
    rescored = json.loads((world / "copy" / "results" / f"{RUN}.json").read_text())
    assert rescored["protocols"]["glue"]["by"] == "experiments.evaluate"
    para = json.loads((world / "lora_copy" / "results" / f"{LORA_RUN}__para-keep0.90.json").read_text())
    assert para["adapter_dir"] == f"runs/{LORA_RUN}__para-keep0.90/adapter"  # relative to its root
    assert (world / "lora_copy" / para["adapter_dir"] / "adapter_model.safetensors").is_file()
    assert para["source"]["adapter_dir"] == f"runs/{LORA_RUN}/adapter"
    assert para["source"]["results_file"] == f"results/{LORA_RUN}.json"


def test_results_files_record_paths_relative_to_their_root(template):
    d = json.loads((template / "out" / "results" / f"{RUN}.json").read_text())
    assert d["adapter_dir"] == f"runs/{RUN}/adapter" and len(d["data_fingerprint"]) == 64


# --- nothing false: the data a run is scored on, every test example ---------------------------------------------
def _commonsense_cfg(root: Path, data: Path, extra=()):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            "backbone=tiny_decoder", "regime=commonsense_15k", "adapter=lora", "adapter.r=2", "logger=none",
            "trainer.max_steps=1", "trainer.progress=false", "trainer.num_threads=1", f"paths.root={root}",
            f"regime.data_path={data / 'train.json'}", f"regime.eval_dir={data}", "regime.eval_tasks=[boolq]",
            "regime.n_val=1", "regime.train.batch_size=2", "regime.max_length=48", "eval.protocols=[glue]",
            *extra])


def test_evaluate_scores_only_the_data_the_run_was_trained_on(tmp_path, capsys):
    """Test data changed after training is refused (not scored under the run's old identity); the same data
    scores; a test example whose answer is empty is an error, never left out of `n`."""
    data = tmp_path / "data"
    (data / "boolq").mkdir(parents=True)
    rows = [{"instruction": f"Is {i} even?", "input": "", "output": f"the correct answer is {'true' if i % 2 else 'false'}",
             "answer": "true" if i % 2 else "false"} for i in range(6)]
    (data / "train.json").write_text(json.dumps(rows))
    (data / "boolq" / "test.json").write_text(json.dumps(rows[:4]))
    res = run(_commonsense_cfg(tmp_path / "out", data, ["eval.protocols=[]"]))
    results = tmp_path / "out" / "results" / f"{res['run_name']}.json"
    args = [f"run={tmp_path / 'out' / 'runs' / res['run_name']}", "protocol=commonsense_gen", "protocol.limit=2",
            "protocol.max_new_tokens=2", "protocol.num_beams=1"]
    assert call_entry("experiments.evaluate", args) == 0
    scored = json.loads(results.read_text())
    assert scored["metrics"]["commonsense_gen"]["n"] == 2
    (data / "boolq" / "test.json").write_text(json.dumps(rows[1:5]))  # the test set changed after training
    before = results.read_bytes()
    capsys.readouterr()
    assert call_entry("experiments.evaluate", args) == 2
    assert re.match(r"error: the data of regime commonsense_15k .* is not the data run .* was trained and tested on",
                    capsys.readouterr().err)
    assert results.read_bytes() == before
    (data / "boolq" / "test.json").write_text(json.dumps([rows[0], {**rows[1], "answer": ""}, *rows[2:4]]))
    assert call_entry("experiments.evaluate", args) == 2
    assert "test example 1 of regime commonsense_15k has an empty 'answer'" in capsys.readouterr().err
    assert results.read_bytes() == before


def test_the_generation_protocol_never_scores_a_quiet_subset():
    """Called directly (an EvalContext built by hand), an example without its answer is an error, not dropped."""
    from omegaconf import OmegaConf

    from experiments.protocols import EvalContext, ProtocolError
    from experiments.protocols.commonsense_gen import commonsense_gen

    regime = OmegaConf.create({"task": "causal_lm", "name": "x"})
    ctx = EvalContext(model=None, processor=None, regime=regime,
                      test=[{"prompt": "p", "answer": "true", "task": "boolq"}, {"prompt": "p", "answer": "", "task": "boolq"}])
    with pytest.raises(ProtocolError, match="test example 1 has no answer"):
        commonsense_gen(ctx, OmegaConf.create({"limit": None}))


def test_two_copies_of_one_results_file_count_once(world):
    """The same run in two folders with the same numbers is one run; with other numbers, an error (the table)."""
    from analysis.load import load_results

    (world / "dup").mkdir()
    shutil.copy(world / "out" / "results" / f"{RUN}.json", world / "dup")
    df = load_results([world / "out" / "results", world / "dup"])
    assert list(df["run_name"]).count(RUN) == 1


def test_out_replaces_only_the_files_analysis_wrote_there(world, capsys):
    """A second build into the same --out replaces its own files; a user's file beside them stays."""
    (world / "tables").mkdir()
    (world / "tables" / "mine.md").write_text("mine\n")
    argv = argv_in(world, ["table1", *AN])
    assert call_entry("analysis", argv) == 0
    first = (world / "tables" / "table1.md").read_text()
    assert call_entry("analysis", argv) == 0
    assert (world / "tables" / "table1.md").read_text() == first
    assert (world / "tables" / "mine.md").read_text() == "mine\n"


def test_report_rebuilds_blocks_and_nothing_outside_them(world):
    """Prose before, between and after blocks stays byte for byte; only the block body is rebuilt."""
    doc = world / "report.md"
    prose = "# Notes\n\nMy words <!-- a comment of mine -->, and `<!-- analysis: x -->` quoted.\n\n"
    doc.write_text(prose + BLOCK + "<!-- /analysis -->\n\nMiddle words.\n\n" + BLOCK + "<!-- /analysis -->\nEnd.\n")
    assert call_entry("analysis.report", [str(doc), "--results", str(world / "out" / "results")]) == 0
    text = doc.read_text()
    assert text.startswith(prose + "<!-- analysis: table1 -->\n") and text.endswith("<!-- /analysis -->\nEnd.\n")
    assert "\n<!-- /analysis -->\n\nMiddle words.\n\n<!-- analysis: table1 -->\n" in text and "old table" not in text


# --- make clean: only what the harness wrote, by its marks ------------------------------------------------------
def test_clean_removes_only_what_the_harness_wrote(world, capsys):
    """Run folders, results files, PARA runs and analysis tables go; a user's notes in outputs/ (in a run folder
    too), a table the user edited, and a top-level runs/ the harness never writes stay."""
    out = world / "out"
    assert call_entry("experiments.para", [f"run={LORA_RUN}", f"paths.root={world / 'lora_out'}",
                                           "para.keep_energy=0.9"]) == 0
    shutil.copytree(world / "lora_out" / "runs", out / "runs", dirs_exist_ok=True)
    shutil.copytree(world / "lora_out" / "results", out / "results", dirs_exist_ok=True)
    assert call_entry("analysis", ["table1", "--results", str(out / "results"), "--out", str(out / "analysis")]) == 0
    (out / "analysis" / "table1.csv").write_text("edited by me\n")
    (out / "notes.txt").write_text("mine\n")
    (out / "runs" / RUN / "mine.txt").write_text("mine\n")
    (out / "results" / "mine.json").write_text('{"not": "a results file"}')
    (world / "runs").mkdir()
    (world / "runs" / "keep.txt").write_text("a top-level runs/ of mine\n")
    assert call_entry("experiments.clean", ["--root", str(out)]) == 0
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["analysis/.lrlora-files", "analysis/table1.csv", "notes.txt", "results/mine.json",
                    f"runs/{RUN}/mine.txt"], left
    assert (world / "runs" / "keep.txt").is_file()
    recipe = subprocess.run(["make", "-n", "clean", f"OUTPUTS={out}"], capture_output=True, text=True, cwd=REPO).stdout
    assert "experiments.clean" in recipe and not re.search(r"rm -rf[^\n]*\b(outputs|runs|multirun)\b", recipe)


# --- leftovers: failed runs, locks ------------------------------------------------------------------------------
def _nan_in_validation(monkeypatch):
    import experiments.train as train_mod

    real = train_mod.build_backbone

    def build(*a, **k):
        model, proc = real(*a, **k)
        forward = model.forward

        def nan_forward(*fa, **fk):
            out = forward(*fa, **fk)
            if not model.training:
                out.loss = out.loss * float("nan")
            return out

        model.forward = nan_forward
        return model, proc

    monkeypatch.setattr(train_mod, "build_backbone", build)


def test_a_nan_validation_loss_is_one_line_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    _nan_in_validation(monkeypatch)
    cfg = cfg_for(tmp_path / "out", extra=["trainer.max_steps=2"])
    assert cli.call(run, cfg) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: validation loss is not finite at step 2 of .*: the model diverged "
                                        r"and nothing was recorded; try a lower regime\.train\.lr", lines[0]), lines
    assert not (tmp_path / "out").exists(), "a run that failed before its first checkpoint leaves nothing"


def test_a_crash_inside_training_keeps_its_traceback_and_leaves_no_run_folder(tmp_path, monkeypatch):
    import experiments.train as train_mod

    def crash(*a, **k):
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(train_mod, "train", crash)
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        cli.call(run, cfg_for(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_run_stopped_after_a_checkpoint_keeps_it(tmp_path, monkeypatch):
    """What a failed run leaves is exactly what a resume needs: its folder, once a checkpoint exists."""
    _nan_from_step(monkeypatch, 3)
    with pytest.raises(UserError):
        run(cfg_for(tmp_path, extra=["trainer.max_steps=4", "trainer.save_every=2"]))
    assert (tmp_path / "runs" / RUN / "checkpoint" / "checkpoint.json").is_file()


def test_evaluate_and_train_leave_no_lock_file(world):
    assert call_entry("experiments.evaluate", [f"run={world / 'out' / 'runs' / RUN}", "protocol=glue"]) == 0
    results = world / "out" / "results" / f"{RUN}.json"
    assert not lock_file(results).exists() and not list(world.rglob("*.lock"))
    assert not lock_file(world / "out" / "runs" / RUN).exists()


def test_a_second_launch_of_a_running_run_is_refused_as_a_process(tmp_path):
    """While one process holds a run (here: this test, as the first launch would), `python -m experiments.train`
    of the same run is one line and exit 2, writing nothing; once it is released, the lock file is gone."""
    argv = [sys.executable, "-m", "experiments.train", "backbone=tiny_encoder", "logger=none", "adapter.r=2",
            "trainer.max_steps=2", "trainer.progress=false", f"paths.root={tmp_path}", f"run_name={RUN}"]
    with exclusive_lock(tmp_path / "runs" / RUN, wait=False):
        p = subprocess.run(argv, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                           timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert re.match(rf"error: run {RUN} is already running in another process \(process {os.getpid()}\); wait",
                    lines[0]), lines
    assert not any(tmp_path.iterdir()) and not lock_file(tmp_path / "runs" / RUN).exists()


def test_a_printed_run_name_works_as_printed(tmp_path, capsys):
    """Run names carry their settings (`__center=true`): passed back as `run=NAME` they parse."""
    res = run(_harness_cfg(tmp_path, "tiny_encoder", "lrlora", ["adapter.center=true"]))
    assert "center=true" in res["run_name"] and f"[{res['run_name']}]" in capsys.readouterr().out
    p = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"run={res['run_name']}",
                        f"paths.root={tmp_path}", "protocol=glue"], capture_output=True, text=True, cwd=REPO,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0 and f"[{res['run_name']}] glue:" in p.stdout, p.stderr


def test_refused_settings_never_load_the_backbone(world, monkeypatch):
    """A protocol that does not fit, an impossible setting: refused before minutes of backbone loading."""
    import experiments.evaluate as evaluate_mod
    import experiments.train as train_mod

    def no(*a, **k):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(train_mod, "build_backbone", no)
    monkeypatch.setattr(evaluate_mod, "build_backbone", no)
    assert call_entry("experiments.train", argv_in(world, ["eval.protocols=[vision]", *NEW])) == 2
    assert call_entry("experiments.evaluate", argv_in(world, [EV[0], "protocol=vision"])) == 2
    assert call_entry("experiments.evaluate", argv_in(world, [*EV, "batch_size=-1"])) == 2


def test_a_peft_folder_loads_without_importing_lrlora_peft_first(template):
    """An LR-LoRA adapter in PEFT's format (what a run saves), read by this repository's loader in a fresh process
    that never imported lrlora.peft: the loader registers the method itself."""
    code = ("import sys; from baselines import load_adapted; from tests.test_guarantees import tiny; "
            "assert 'lrlora.peft' not in sys.modules; "
            f"h = load_adapted(tiny('lrlora')[0], {str(template / 'lrlora_run_adapter')!r}); print(h.name)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0 and p.stdout.strip().endswith("lrlora"), p.stderr


# --- a NaN run -----------------------------------------------------------------------------------------------
def _nan_from_step(monkeypatch, first_bad: int, last_bad: int = 10**9):
    """The training loss is NaN at optimizer steps first_bad..last_bad (1-based), as a diverged run's is."""
    import experiments.train as train_mod

    real = train_mod.build_backbone
    calls = {"n": 0}

    def build(*a, **k):
        model, proc = real(*a, **k)
        forward = model.forward

        def nan_forward(*fa, **fk):
            out = forward(*fa, **fk)
            if model.training:
                calls["n"] += 1
                if first_bad <= calls["n"] <= last_bad:
                    out.loss = out.loss * float("nan")
            return out

        model.forward = nan_forward
        return model, proc

    monkeypatch.setattr(train_mod, "build_backbone", build)


def test_nan_loss_stops_the_run_and_records_nothing(tmp_path, monkeypatch):
    from lrlora.errors import NonFiniteError

    _nan_from_step(monkeypatch, 3)
    with pytest.raises(NonFiniteError, match=r"training loss is nan at step 3 of .*nothing was recorded\. Try a "
                                             r"lower learning rate .*trainer\.max_skipped_nonfinite=N"):
        run(cfg_for(tmp_path, extra=["trainer.max_steps=4", "trainer.save_every=2"]))
    run_dir = tmp_path / "runs" / RUN
    assert not (tmp_path / "results").exists(), "no results file for a diverged run"
    assert not (run_dir / "adapter").exists(), "no adapter saved from a diverged run"
    ckpt = json.loads((run_dir / "checkpoint" / "checkpoint.json").read_text())
    assert ckpt["step"] == 2, "the last good checkpoint stays"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def test_nan_steps_can_be_skipped_when_asked(tmp_path, monkeypatch):
    _nan_from_step(monkeypatch, 2, 2)
    res = run(cfg_for(tmp_path, extra=["trainer.max_steps=4", "trainer.max_skipped_nonfinite=1"]))
    train = res["metrics"].get("train", res["metrics"])  # metrics.train.* once the protocol split lands
    assert train["steps"] == 4 and math.isfinite(train["final_train_loss"])
    json.loads((tmp_path / "results" / f"{RUN}.json").read_text(), parse_constant=lambda c: 1 / 0)  # strict


# --- two configurations under one name; a finished run re-run ---------------------------------------------------
def test_a_run_whose_every_step_was_skipped_is_an_error(tmp_path, monkeypatch):
    from lrlora.errors import NonFiniteError

    _nan_from_step(monkeypatch, 1)
    with pytest.raises(NonFiniteError, match="took no optimizer step that changed the weights"):
        run(cfg_for(tmp_path, extra=["trainer.max_steps=3", "trainer.max_skipped_nonfinite=5"]))
    assert not (tmp_path / "results").exists()


def test_two_configurations_under_one_name_keep_both_outputs(tmp_path):
    from experiments.guard import RunConflict

    first = run(cfg_for(tmp_path))
    before = snapshot(tmp_path)
    with pytest.raises(RunConflict):
        run(cfg_for(tmp_path, extra=["adapter.K=10"]))
    assert snapshot(tmp_path) == before
    second = run(cfg_for(tmp_path, extra=["adapter.K=10", f"run_name={RUN}__K10"]))  # its own name: both kept
    assert json.loads((tmp_path / "results" / f"{RUN}.json").read_text())["metrics"] == first["metrics"]
    assert second["config"]["adapter"]["K"] == 10 and (tmp_path / "runs" / f"{RUN}__K10" / "adapter").is_dir()


def test_rerunning_a_finished_run_says_done_and_force_retrains(tmp_path, capsys):
    first = run(cfg_for(tmp_path))
    before = snapshot(tmp_path)
    capsys.readouterr()
    again = run(cfg_for(tmp_path))
    assert "already done" in capsys.readouterr().out and again["metrics"] == first["metrics"]
    assert snapshot(tmp_path) == before
    (tmp_path / "runs" / RUN / "notes.txt").write_text("mine")  # a user's file in the run folder survives
    forced = run(cfg_for(tmp_path, extra=["trainer.force=true", "trainer.progress=true"]))
    assert forced["metrics"] == first["metrics"] and (tmp_path / "runs" / RUN / "notes.txt").read_text() == "mine"
    steps = [json.loads(r)["step"] for r in (tmp_path / "runs" / RUN / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "a forced restart starts metrics.jsonl afresh"


def test_load_adapter_restores_the_saved_layer_settings(tmp_path):
    """Onto a model that already has LR-LoRA layers with other center/pre/post scales, the saved ones win."""
    model, kw = tiny("lrlora")
    apply_lrlora(model, LRLoRAConfig(**{**kw, "center": True, "pre_scale": 2.0, "post_scale": 0.5}))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    ids = torch.randint(0, 100, (2, 8))
    model.eval()
    expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "a")
    other, _ = tiny("lrlora")
    apply_lrlora(other, LRLoRAConfig(**kw))  # center False, scales 1
    load_adapter(other, tmp_path / "a")
    other.eval()
    assert torch.equal(other(input_ids=ids).logits, expected)
    assert all(m.center and m.pre_scale == 2.0 and m.post_scale == 0.5 for m in lrlora_modules(other).values())


def test_save_into_our_folder_replaces_only_our_files(tmp_path):
    model, kw = tiny("lora")
    h = apply_adapter(model, name="lora", **kw)
    h.save(tmp_path / "a")
    (tmp_path / "a" / "README-mine.txt").write_text("keep me")
    weights = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    next(p for p in h.model.parameters() if p.requires_grad).data.add_(1.0)
    h.save(tmp_path / "a")
    assert (tmp_path / "a" / "README-mine.txt").read_text() == "keep me"
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != weights
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_a_crash_between_the_two_renames_of_a_swap_is_recovered(tmp_path):
    """The one window of a folder swap: the old folder renamed away, the new one not yet in place. The next
    read (or write) puts the folder back."""
    from lrlora._atomic import _hidden_temp

    model, kw = tiny("lora")
    h = apply_adapter(model, name="lora", **kw)
    h.save(tmp_path / "a")
    away = _hidden_temp(tmp_path / "a", "old")
    away.rmdir()
    (tmp_path / "a").rename(away)  # what the first rename does; the crash comes before the second
    load_adapted(tiny("lora")[0], tmp_path / "a")
    assert (tmp_path / "a" / "baselines_meta.json").is_file() and not away.exists()


def test_atomic_writers_never_share_a_temp_name(tmp_path):
    with atomic_file(tmp_path / "x.json") as a, atomic_file(tmp_path / "x.json") as b:
        assert a != b
        a.write_text("1")
        b.write_text("2")
    assert (tmp_path / "x.json").read_text() in ("1", "2")
    with atomic_directory(tmp_path / "d") as d1, atomic_directory(tmp_path / "e") as d2:
        assert d1 != d2


# --- kill -9 at random points, then the same command -------------------------------------------------------------
@pytest.mark.slow
def test_kill_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    import random

    def cmd(root):
        return [sys.executable, "-m", "experiments.train", "backbone=tiny_encoder", "regime=bbc_news", "logger=none",
                "adapter.r=2", "trainer.max_steps=16", "trainer.save_every=1", "trainer.eval_every=4", "trainer.log_every=1",
                "trainer.progress=false", "trainer.num_threads=1", f"paths.root={root}", "regime.n_train=16",
                "regime.n_val=8", "regime.n_test=8", "regime.max_length=32", "regime.train.batch_size=8",
                "regime.adapter_dropout=0.1", f"run_name={RUN}"]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd(tmp_path / "a"), check=True, cwd=REPO, env=env, capture_output=True, timeout=600)
    duration = time.perf_counter() - t0  # start-up + 16 steps with 16 saves: kill somewhere inside that
    full = json.loads((tmp_path / "a" / "results" / f"{RUN}.json").read_text())
    rng, kills, mid_run = random.Random(0), 0, 0
    for _ in range(30):
        p = subprocess.Popen(cmd(tmp_path / "b"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.4, 0.95) * duration)
        if p.poll() is None:
            mid_run += (tmp_path / "b" / "runs" / RUN / "checkpoint").exists()  # killed after a checkpoint
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        if (tmp_path / "b" / "results" / f"{RUN}.json").exists():
            break
    out = subprocess.run(cmd(tmp_path / "b"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    resumed = json.loads((tmp_path / "b" / "results" / f"{RUN}.json").read_text())
    assert kills >= 1 and mid_run >= 1, (kills, mid_run)
    assert resumed["metrics"] == full["metrics"]
    rows = (tmp_path / "b" / "runs" / RUN / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(r)["step"] for r in rows if "train_loss" in r]
    assert steps == sorted(set(steps))


# --- the console: progress and results, not internals -----------------------------------------------------------
def test_checkpoint_saves_log_nothing_to_the_console(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    run(cfg_for(tmp_path, extra=["trainer.max_steps=2", "trainer.save_every=1"]))
    assert not [r for r in caplog.records if r.name.startswith("accelerate") and r.levelno < logging.WARNING]


def test_the_one_time_kernel_build_is_announced(tmp_path, monkeypatch, capsys):
    import torch.utils.cpp_extension as ext

    from lrlora import _kernels

    monkeypatch.setattr(ext, "_get_build_directory", lambda name, verbose=False: str(tmp_path))
    _kernels._say_if_compiling("lrlora_x")
    assert "compiling the fused σ kernels for this CPU, once" in capsys.readouterr().out
    (tmp_path / "lrlora_x.so").write_bytes(b"")
    _kernels._say_if_compiling("lrlora_x")
    assert capsys.readouterr().out == ""
