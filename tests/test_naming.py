"""Run identity (experiments/naming.py): a run's name changes whenever a result-affecting setting does, stays
the same for the same command (so resume finds its checkpoint), and a multirun writes one folder and one
results file per variant."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.naming import suffix_for
from experiments.train import run

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
TINY = ["backbone=tiny_decoder", "regime=bbc_news_gen", "adapter=lrlora", "adapter.r=2", "logger=none",
        "trainer.max_steps=2", "trainer.progress=false", "trainer.num_threads=1", "regime.n_train=8",
        "regime.n_val=4", "regime.n_test=2", "regime.max_length=48", "regime.article_chars=80",
        "regime.train.batch_size=4", "regime.generation.max_new_tokens=3"]


def name(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides)).run_name


def test_suffix_rules():
    ref = {"adapter.center": False, "adapter.basis": "sinc", "regime.train.lr": 1e-4, "adapter.lr": None}
    assert suffix_for(dict(ref), ref) == ""
    assert suffix_for({**ref, "adapter.center": True, "adapter.basis": "gaussian"}, ref) == \
        "__basis=gaussian__center=true"
    # two differing keys with the same last part keep enough of their path to stay apart
    assert suffix_for({**ref, "adapter.lr": 0.01, "regime.train.lr": 0.1}, ref) == "__adapter.lr=0.01__train.lr=0.1"
    long = {**ref, "adapter.center": True, **{f"regime.knob_{i}": i for i in range(12)}}
    s = suffix_for(long, ref)
    assert s.startswith("__center=true__cfg-") and len(s) == len("__center=true__cfg-") + 8
    assert s != suffix_for({**long, "regime.knob_3": 99}, ref), "the hash covers every hidden setting"


def test_names_follow_the_config_not_the_command():
    base = name(["backbone=tiny_decoder", "regime=bbc_news_gen"])
    assert base == "tiny_decoder__lrlora__bbc_news_gen__r16__s42"
    assert name(["backbone=tiny_decoder", "regime=bbc_news_gen", "adapter.center=true"]) == base + "__center=true"
    # runtime knobs, tags and the logger are not part of a run's identity
    assert name(["backbone=tiny_decoder", "regime=bbc_news_gen", "trainer.num_threads=1", "logger=none",
                 "tags=[table3]", "trainer.progress=false"]) == base
    # the paper's Table 1 rows are pure coordinates; an experiment that changes more says so in its name
    assert name(["experiment=qwen2_cs170k_lrlora32"]) == "qwen2_0.5b__lrlora__commonsense_170k__r32__s42"
    assert name(["experiment=demo_bbc_lrlora"]).startswith("minilm_l6__lrlora__bbc_news__r4__s42__center=true__cfg-")
    # stable: the same command gives the same name (resume finds its checkpoint)
    assert name(["experiment=demo_bbc_lrlora"]) == name(["experiment=demo_bbc_lrlora"])


def test_two_runs_differing_only_in_center_get_two_names_and_two_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = set()
    for center in ("true", "false"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[*TINY, f"paths.root={tmp_path}", f"adapter.center={center}"])
        res = run(cfg)
        names.add(res["run_name"])
        on_disk = json.loads((tmp_path / "results" / f"{res['run_name']}.json").read_text())
        assert on_disk["config"]["adapter"]["center"] is (center == "true")
    assert len(names) == 2 and len(list((tmp_path / "results").glob("*.json"))) == 2
    assert len([p for p in (tmp_path / "runs").iterdir() if p.is_dir()]) == 2


def test_multirun_writes_one_folder_and_one_results_file_per_variant(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "experiments.train", "-m", *TINY, f"paths.root={tmp_path}",
           "adapter.basis=sinc,gaussian"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = sorted(p.stem for p in (tmp_path / "results").glob("*.json"))
    assert len(results) == 2 and results[0].endswith("__basis=gaussian__cfg-" + results[0][-8:])
    assert sorted(p.name for p in (tmp_path / "multirun").iterdir() if p.is_dir()) == results


def test_a_setting_added_later_at_its_default_keeps_old_names_fingerprints_and_grouping(tmp_path, monkeypatch):
    """experiments/identity.py's rule: an option listed in ADDED with its default counts as that default in a
    config that lacks it, so a run made before the option existed keeps its name, its fingerprint, its results
    file's currency and its place among the method's own runs; another value is a variant of its own."""
    import shutil

    import yaml
    from omegaconf import OmegaConf

    from analysis.load import variant_of
    from analysis.reproduce import staleness
    from experiments import guard, hydra_cli, identity, naming

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    spec = yaml.safe_load((conf / "adapter" / "lrlora.yaml").read_text())
    (conf / "adapter" / "lrlora.yaml").write_text(yaml.safe_dump({**spec, "new_knob": 0.5}))
    overrides = [*TINY, f"paths.root={tmp_path / 'out'}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        old = compose("train", overrides=overrides)  # a run made before the option existed
        old_config = OmegaConf.to_container(old, resolve=True)

    def composed(extra=()):
        monkeypatch.setattr(hydra_cli, "CONF_DIR", conf)
        monkeypatch.setattr(naming, "_REFERENCE", {})
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, *extra])
            return cfg, OmegaConf.to_container(cfg, resolve=True)

    results = tmp_path / "out" / "results"
    results.mkdir(parents=True)
    (results / f"{old.run_name}.json").write_text(json.dumps({"config": old_config, "seed": old.seed}))

    def identity_of(cfg, config):
        return (cfg.run_name, guard.run_fingerprint(config, "data"), staleness(cfg, any_commit=True),
                variant_of({"adapter": "lrlora", "config": config}))

    before = (old.run_name, guard.run_fingerprint(old_config, "data"), None, "")
    assert identity_of(*composed()) != before, "unlisted, a new option changes the old runs' identity"
    monkeypatch.setattr(identity, "ADDED", {"adapter.new_knob": 0.5})
    assert identity_of(*composed()) == before
    cfg, config = composed(["adapter.new_knob=0.7"])
    name_, fingerprint, stale, variant = identity_of(cfg, config)
    assert "__new_knob=0.7" in name_ and fingerprint != before[1] and variant == "new_knob=0.7"


# One case per setting of experiments.identity.ADDED: overrides under which today's conf/ sets it, and another value.
ADDED_CASES = {"backbone.pooling": (["backbone=tiny_encoder", "regime=bbc_news"], "mean")}


def test_every_setting_added_later_has_a_case():
    from experiments import identity

    assert set(ADDED_CASES) == set(identity.ADDED), "add the new setting to ADDED_CASES"


@pytest.mark.parametrize("key", sorted(ADDED_CASES))
def test_each_setting_added_later_keeps_the_identity_of_runs_made_before_it(tmp_path, monkeypatch, key):
    """The real ADDED entries: conf/ as it was before the option (the key deleted from every file that sets it)
    and today's compose to the same run name, fingerprint, currency and analysis variant; another value is a run
    of its own."""
    import shutil

    import yaml
    from omegaconf import OmegaConf

    from analysis.load import variant_of
    from analysis.reproduce import staleness
    from experiments import guard, naming

    overrides, other = ADDED_CASES[key]
    group, *path = key.split(".")
    before = tmp_path / "conf"
    shutil.copytree(CONF, before)
    in_group = (before / group).is_dir()
    for f in sorted((before / group).glob("*.yaml")) if in_group else [before / "train.yaml"]:
        tree = yaml.safe_load(f.read_text())
        node = tree
        for part in (path if in_group else [group, *path])[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            del node[path[-1]]
            f.write_text(yaml.safe_dump(tree))
    results = tmp_path / "out" / "results"
    results.mkdir(parents=True)

    def identity_of(conf, extra=()):
        monkeypatch.setattr(naming, "_REFERENCE", {})
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, f"paths.root={tmp_path / 'out'}", *extra])
            config = OmegaConf.to_container(cfg, resolve=True)
            return (cfg.run_name, guard.run_fingerprint(config, "data"), staleness(cfg, any_commit=True),
                    variant_of({"adapter": cfg.adapter.name, "config": config})), config

    (name_, fingerprint, _, variant), old_config = identity_of(before)  # a run made before the option existed
    assert OmegaConf.select(OmegaConf.create(old_config), key) is None, "the old conf/ must lack the setting"
    (results / f"{name_}.json").write_text(json.dumps({"config": old_config, "seed": old_config["seed"]}))
    now, config = identity_of(CONF)
    assert OmegaConf.select(OmegaConf.create(config), key) is not None
    assert now == (name_, fingerprint, None, variant)
    (other_name, other_fingerprint, _, _), _ = identity_of(CONF, [f"{key}={other}"])
    assert other_name == f"{name_}__{path[-1]}={other}" and other_fingerprint != fingerprint
