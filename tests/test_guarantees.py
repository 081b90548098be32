"""Nothing lost, nothing false: a table of bad inputs and faults, each failing with its one-line message and
leaving every file on disk as it was; a NaN run; two configurations under one name; a finished run re-run.

    python -m pytest -q tests/test_guarantees.py            # the table and the rest (CPU, ~1 min)
    python -m pytest -q -m slow tests/test_guarantees.py    # + kill -9 at random points, resumed
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from baselines import apply_adapter, load_adapted
from baselines.para import cli as para_cli
from experiments.backbones import build_backbone
from experiments.results import write_results
from experiments.train import adapter_kwargs, run
from lrlora import LRLoRAConfig, apply_lrlora, load_adapter, lrlora_modules, save_adapter
from lrlora._atomic import atomic_directory, atomic_file
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
    return root


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


def _para(*args):
    def case(w):
        argv = []
        for a in args:
            argv.append(str(w / a[1:]) if isinstance(a, str) and a.startswith("@") else a)
        code = para_cli(argv)
        assert code == 2
        raise _ParaFailed()
    return case


class _ParaFailed(Exception):
    pass


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
     r"adapter_model\.safetensors is missing or unreadable"),
    ("load truncated lrlora", (_write("lrlora_adapter/adapter_model.safetensors", b"\x00"),
                               _model_unchanged(lambda m, kw, w: load_adapter(m, w / "lrlora_adapter"))),
     r"adapter_model\.safetensors is unreadable or corrupt"),
    ("load truncated self-written", (lambda w: _save_handle_to("sine", "sinelora")(w) or _write(
        "sine/adapter.safetensors", b"\x00")(w), _model_unchanged(lambda m, kw, w: load_adapted(m, w / "sine"))),
     r"adapter\.safetensors is missing or unreadable"),
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
    # PARA's command line: one error line, exit status 2, never writing into its input
    ("para keep-energy 1.5", _para("--adapter", "@lora_adapter", "--keep-energy", "1.5", "--out", "@p"),
     r"^error: --keep-energy must be in \(0, 1\], got 1\.5"),
    ("para keep-energy 0", _para("--adapter", "@lora_adapter", "--keep-energy", "0", "--out", "@p"),
     r"^error: --keep-energy must be in \(0, 1\]"),
    ("para reduction 1", _para("--adapter", "@lora_adapter", "--reduction", "1", "--out", "@p"),
     r"^error: --reduction must be in \[0, 1\), got 1\.0"),
    ("para reduction <0", _para("--adapter", "@lora_adapter", "--reduction", "-0.1", "--out", "@p"),
     r"^error: --reduction must be in \[0, 1\)"),
    ("para missing adapter", _para("--adapter", "@nope", "--keep-energy", "0.9", "--out", "@p"),
     r"^error: --adapter .*nope does not exist"),
    ("para out = input", _para("--adapter", "@lora_adapter", "--keep-energy", "0.9", "--out", "@lora_adapter"),
     r"^error: --out .* is, contains or lies inside the input --adapter .*: PARA never writes into its own input"),
    ("para out inside input", _para("--adapter", "@lora_adapter", "--keep-energy", "0.9", "--out",
                                    "@lora_adapter/sub"), r"lies inside the input"),
    ("para out contains input", _para("--adapter", "@lora_adapter", "--keep-energy", "0.9", "--out", "@."),
     r"lies inside the input"),
    ("para out foreign", _para("--adapter", "@lora_adapter", "--keep-energy", "0.9", "--out", "@notes"),
     r"^error: .*notes is not empty and was not written as a PARA adapter folder"),
    ("para out = a trained adapter", _para("--adapter", "@lora_adapter", "--keep-energy", "0.9", "--out",
                                          "@lrlora_adapter"), r"^error: .*lrlora_adapter is not empty and was not "
                                                              r"written as a PARA adapter folder"),
    ("para lrlora no base", _para("--adapter", "@lrlora_run_adapter", "--keep-energy", "0.9", "--out", "@p"),
     r"^error: .* holds a 'lrlora' adapter, not a plain LoRA: pass --base-model"),
    ("para non-adapter", _para("--adapter", "@notes", "--keep-energy", "0.9", "--out", "@p"),
     r"^error: .*notes is not an adapter folder"),
]


@pytest.mark.parametrize("case, fault, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(world, case, fault, message, capsys):
    if isinstance(fault, tuple):  # (put the fault in place, then act): the snapshot is taken in between
        prepare, fault = fault
        prepare(world)
    before = snapshot(world)
    with pytest.raises((UserError, _ParaFailed)) as info:
        fault(world)
    text = capsys.readouterr().err.strip() if info.type is _ParaFailed else str(info.value)
    assert "\n" not in text, text
    assert __import__("re").search(message, text), text
    assert snapshot(world) == before, "a refused input changed files on disk"


def test_the_table_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


# --- the command line: one line on stderr, no traceback, no run folder left behind --------------------------
def test_cli_bad_override_is_one_line_and_leaves_no_run_folder(tmp_path):
    cmd = [sys.executable, "-m", "experiments.train", "backbone=tiny_encoder", "adapter.r=abc", "logger=none",
           f"paths.root={tmp_path}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["error: adapter.r='abc' must be a positive integer, e.g. adapter.r=8 "
                                             "(lrlora)"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_para_cli_threshold_out_of_range_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "baselines.para", "--adapter", str(tmp_path), "--keep-energy", "1.5", "--out",
           str(tmp_path / "out")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["error: --keep-energy must be in (0, 1], got 1.5 (e.g. 0.9 keeps 90% "
                                             "of Σσ²)"]
    assert not (tmp_path / "out").exists()


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
