"""Every entry point's command line (CLI_CASES): a user's mistake exits with status 2 and exactly one `error:` line
that says the fix, and leaves every file on disk as it was; so does a disk that refuses the write. A bug is not a
user error: it keeps its traceback and exits 1. The cases run in this process through lrlora.cli, exactly as
`python -m` runs them (a few main ones, and in the slow test every entry point, as processes); and the method
library imports neither the harness nor its frameworks, so that it works with torch alone.

    python -m pytest -q tests/guarantees/test_guarantees_cli.py
    python -m pytest -q -m slow tests/guarantees/test_guarantees_cli.py    # + every entry point as a process
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest

from lrlora import cli
from tests.guarantees.world import (
    AN,
    BLOCK,
    ENTRIES,
    EV,
    LORA_RUN,
    NEW,
    REPO,
    RUN,
    _edit_json,
    _flip_payload,
    argv_in,
    call_entry,
    snapshot,
)


# --- every entry point's command line: exit status 2 and one `error:` line; nothing on disk changes -----------
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
PA = ["adapter_dir=@lora_adapter", "out=@p"]
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


def test_the_tables_have_their_cases():
    assert len(CLI_CASES) >= 90 and len({c[1] for c in CLI_CASES}) == len(CLI_CASES)
    assert {c[2] for c in CLI_CASES} == set(ENTRIES), "every entry point has its cases"
