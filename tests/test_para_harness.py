"""PARA through the harness (experiments.para): a tiny trained LoRA run is compressed, reloaded, scored with its
own protocols and written as a run of its own; the source run is only read.

    python -m pytest -q tests/test_para_harness.py
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.para import para_run_name, run_para, setting_label
from lrlora.errors import AdapterError, ConfigError, UnsafeWrite

ROOT = Path(__file__).resolve().parent.parent
TINY = ["backbone=tiny_encoder", "regime=bbc_news", "logger=none", "trainer.max_steps=6", "trainer.progress=false",
        "trainer.num_threads=1", "regime.n_train=16", "regime.n_val=8", "regime.n_test=16",
        "regime.max_length=32", "regime.train.batch_size=8", "regime.train.lr=0.01", "tags=[demo]"]


def _train(root: Path, adapter: str, extra=()) -> dict:
    from experiments.train import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"adapter={adapter}", "adapter.r=4", f"paths.root={root}", *extra])
    return run(cfg)


def _fingerprint(*paths: Path) -> dict:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("para_harness")
    trained = _train(root, "lora")
    return root, trained


def test_para_run_writes_a_scored_results_file_and_leaves_the_source_alone(lora_run, capsys):
    root, src = lora_run
    results_dir = root / "results"
    src_file = results_dir / f"{src['run_name']}.json"
    before = _fingerprint(src_file, root / "runs" / src["run_name"])

    # keep_energy 1: every singular value kept, so the reloaded adapter must score exactly as the source
    full = run_para(src["run_name"], keep_energy=1.0, results_dir=results_dir)
    name = f"{src['run_name']}__para-keep1.00"
    assert full["run_name"] == name and (results_dir / f"{name}.json").is_file()
    assert full["adapter_dir"] == f"runs/{name}/adapter"  # relative to its root: a copy stands alone
    assert json.loads((results_dir / f"{name}.json").read_text()) == full
    for k in ("backbone", "adapter", "regime", "r", "seed"):
        assert full[k] == src[k]
    assert full["tags"] == ["demo", "para"]
    assert full["config"]["para"] == {"keep_energy": 1.0, "reduction": None, "source_run": src["run_name"]}
    assert {k: v for k, v in full["config"].items() if k not in ("para", "run_name", "paths")} == \
        {k: v for k, v in src["config"].items() if k not in ("run_name", "paths")}
    assert set(full["metrics"]) == {"glue", "para"} and set(full["protocols"]) == set(src["protocols"])
    assert full["metrics"]["glue"]["accuracy"] == src["metrics"]["glue"]["accuracy"]
    assert full["metrics"]["glue"]["loss"] == pytest.approx(src["metrics"]["glue"]["loss"], rel=1e-4)
    p = full["metrics"]["para"]
    assert p["params_before"] == src["params"]["trainable"]  # both count the LoRA factors, the head apart
    assert full["params"]["head"] == src["params"]["head"] and full["params"]["total"] == src["params"]["total"]
    assert set(p) == {"params_before", "params_after", "reduction", "energy_kept", "threshold", "ranks"}
    assert full["params"]["trainable"] == p["params_after"]  # counted on the reloaded model
    assert p["energy_kept"] == pytest.approx(1.0) and set(p["ranks"]) == set(src["stable_ranks"]["per_layer"])

    # a strong reduction: the parameter count drops by at least that much, and the adapter reloads and scores
    red = run_para(str(root / "runs" / src["run_name"]), reduction=0.75, results_dir=results_dir)
    q = red["metrics"]["para"]
    assert red["run_name"] == f"{src['run_name']}__para-red0.75"
    assert red["params"]["trainable"] == q["params_after"] <= 0.25 * q["params_before"]
    assert q["reduction"] >= 0.75 and 0 < q["energy_kept"] < 1 and max(q["ranks"].values()) < src["r"]
    assert 0 <= red["metrics"]["glue"]["accuracy"] <= 1 and red["metrics"]["glue"]["n"] == src["metrics"]["glue"]["n"]
    # the compressed adapter, not the source's, was scored: 75% fewer parameters moves the test loss
    assert red["metrics"]["glue"]["loss"] != pytest.approx(src["metrics"]["glue"]["loss"], rel=1e-6)
    report = json.loads((root / "runs" / red["run_name"] / "adapter" / "para_report.json").read_text())
    assert report["ranks_after"] == q["ranks"]

    assert _fingerprint(src_file, root / "runs" / src["run_name"]) == before  # the source: byte-identical
    capsys.readouterr()

    # the same setting again: nothing is recomputed or rewritten (the command line, so also its exit status)
    after = _fingerprint(results_dir, root / "runs")
    cmd = [sys.executable, "-m", "experiments.para", f"run={src['run_name']}", "para.reduction=0.75",
           f"paths.root={root}", "num_threads=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "already done" in proc.stdout, proc.stderr
    assert _fingerprint(results_dir, root / "runs") == after

    # a results file of that name from another source config is refused, not overwritten
    path = results_dir / f"{red['run_name']}.json"
    original = path.read_bytes()
    doctored = json.loads(original)
    doctored["config"]["seed"] = 7
    path.write_text(json.dumps(doctored))
    with pytest.raises(UnsafeWrite, match="never overwrites"):
        run_para(src["run_name"], reduction=0.75, results_dir=results_dir)
    assert json.loads(path.read_text()) == doctored
    path.write_bytes(original)


def test_para_bad_input_is_one_error_line(lora_run, tmp_path):
    root, src = lora_run
    results_dir = root / "results"
    snapshot = _fingerprint(results_dir, root / "runs")
    for kw, message in (({}, "exactly one of para.keep_energy or para.reduction"),
                        ({"keep_energy": 0.9, "reduction": 0.5}, "exactly one"),
                        ({"keep_energy": 1.5}, r"para.keep_energy must be in \(0, 1\]"),
                        ({"reduction": 1.0}, r"para.reduction must be in \[0, 1\)")):
        with pytest.raises(ConfigError, match=message):
            run_para(src["run_name"], results_dir=results_dir, **kw)
    lrlora = _train(tmp_path, "lrlora")
    with pytest.raises(AdapterError, match="takes a plain LoRA run"):
        run_para(lrlora["run_name"], keep_energy=0.9, results_dir=tmp_path / "results")
    assert not list((tmp_path / "results").glob("*__para-*"))
    assert _fingerprint(results_dir, root / "runs") == snapshot

    # the command line: one `error:` line, exit status 2, no traceback
    for args, message in ((["run=nope", "para.keep_energy=0.9"], "error: no results file for run 'nope'"),
                          ([f"run={src['run_name']}"], "error: give exactly one of para.keep_energy"),
                          ([f"run={src['run_name']}", "para.keep_energy=2"], "error: para.keep_energy must be in")):
        proc = subprocess.run([sys.executable, "-m", "experiments.para", *args, f"paths.root={root}"],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_setting_labels_tell_settings_apart():
    assert setting_label(keep_energy=0.9) == "para-keep0.90" and setting_label(reduction=0.75) == "para-red0.75"
    assert setting_label(keep_energy=0.995) == "para-keep0.995" != setting_label(keep_energy=0.99)
    assert para_run_name("x", reduction=0.9) == "x__para-red0.90"


def test_para_table_reads_harness_files_and_other_tables_do_not(lora_run, tmp_path):
    """The `para` target: one block per source run (its own results file first, then each setting, with the
    change in score in points); every other target leaves PARA's copies out (they share the source's identity)."""
    from analysis.load import load_results, para_derived
    from analysis.registry import build

    root, src = lora_run
    results_dir = root / "results"
    for kw in ({"keep_energy": 0.9}, {"reduction": 0.75}):
        run_para(src["run_name"], results_dir=results_dir, **kw)
    df = load_results([results_dir])
    table = build("para", df=df, out=tmp_path)
    rows = [r for r in table.rows if r[1] == "none" or r[1] in ("keep-energy 0.90", "reduction 0.75")]
    label = f"LoRA (r=4, seed {src['seed']})"
    assert [r[:2] for r in rows] == [[label, "none"], [label, "keep-energy 0.90"], [label, "reduction 0.75"]]
    src_score = 100 * src["metrics"]["glue"]["accuracy"]
    assert rows[0][2:5] == [f"{src_score:.1f}", "—", f"{src['params']['trainable']:,}"]
    red = json.loads((results_dir / f"{src['run_name']}__para-red0.75.json").read_text())
    score = 100 * red["metrics"]["glue"]["accuracy"]
    assert rows[2][2:] == [f"{score:.1f}", f"{score - src_score:+.1f}", f"{red['params']['trainable']:,}",
                           f"{100 * red['metrics']['para']['reduction']:.1f}%",
                           f"{red['metrics']['para']['energy_kept']:.3f}"]
    assert f"`{src['run_name']}`" in table.notes[-1]
    assert para_derived(df).sum() == len(df) - 1  # all but the source
    demo = build("demo", df=df, out=tmp_path / "demo")
    assert len(demo.rows) == 1  # the source run only
