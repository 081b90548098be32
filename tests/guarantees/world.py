"""What the guarantee tests share: the one run name their faults happen in, a tiny model and a run's config, a
snapshot of every file under a folder (how "changed nothing" is measured), each entry point called in this process
exactly as `python -m` calls it, and the fault helpers and arguments that more than one module's tests use. One copy
here, so that the tables and the tests beside them put faults in place and call entry points the same way.

    python -m pytest -q tests/guarantees            # the tables and the rest (CPU, ~3 min)
    python -m pytest -q -m slow tests/guarantees    # + every entry point as a process; kill -9, resumed
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import torch

from experiments import hydra_cli
from experiments.backbones import build_backbone
from experiments.train import adapter_kwargs
from lrlora import cli
from tests.test_harness import cfg_for as _harness_cfg

# One fixed name for the runs of these tests: names follow the config (experiments/naming.py), and these faults are
# about what happens inside one run folder, whichever name it has.
RUN = "tiny_encoder__lrlora__bbc_news__r2__s42"


def cfg_for(tmp_path, backbone="tiny_encoder", adapter="lrlora", extra=()):
    named = any(e.startswith("run_name=") for e in extra)
    return _harness_cfg(tmp_path, backbone, adapter, [*extra] if named else [*extra, f"run_name={RUN}"])


REPO = Path(__file__).resolve().parent.parent.parent


def tiny(adapter="lora"):
    """A fresh tiny BERT classifier and the kwargs the harness would give `adapter`."""
    torch.manual_seed(0)
    cfg = cfg_for(Path("/nonexistent"), "tiny_encoder", adapter)
    model = build_backbone(cfg.backbone, "classification", 5)[0]
    return model, adapter_kwargs(cfg)


LORA_RUN = "tiny_encoder__lora__bbc_news__r2__s42"
REPORT = "# Notes\n\nMy words.\n\n<!-- analysis: table1 -->\nold table\n<!-- /analysis -->\n\nMore of my words.\n"


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _flip_payload(rel: str):
    """Change one byte of a safetensors file's tensor data, its header intact: the file still parses."""
    def prepare(w):
        p = w / rel
        data = bytearray(p.read_bytes())
        header = int.from_bytes(data[:8], "little")
        data[8 + header] ^= 0x40
        p.write_bytes(bytes(data))
    return prepare


# entry point -> (its module, its Hydra config or None for argparse); called in this process through lrlora.cli (experiments.hydra_cli for Hydra)
# exactly as `python -m <entry point>` calls it (the slow test in test_guarantees_cli.py runs them as processes).
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


EV = [f"run=@out/runs/{RUN}", "protocol=glue"]
AN = ["--results", "@out/results", "--out", "@tables"]
NEW = ["backbone=tiny_encoder", "logger=none", "paths.root=@new"]
BLOCK = "<!-- analysis: table1 -->\nold table\n"


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
