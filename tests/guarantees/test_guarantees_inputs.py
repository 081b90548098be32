"""Bad input to the library and the harness called in Python (CASES): a config value, a data file, a checkpoint, a
run folder or results file of another configuration, an adapter folder, a library call. Each is one `UserError` of
one line, worded as the table says, and leaves every file on disk (and a model passed in) as it was: a refusal
comes before the first write, never after it.

    python -m pytest -q tests/guarantees/test_guarantees_inputs.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from baselines import apply_adapter, load_adapted
from experiments.backbones import build_backbone
from experiments.results import write_results
from experiments.train import run
from lrlora import LRLoRAConfig, apply_lrlora, load_adapter
from lrlora._atomic import exclusive_lock
from lrlora.errors import UserError
from tests.guarantees.world import REPO, RUN, _flip_payload, cfg_for, snapshot, tiny


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
