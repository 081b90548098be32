"""The Hydra configs compose: every experiment file, every group option, the sweeps and the SLURM launcher;
the groups carry the paper's defaults (Table 10); a wrong group name fails with the options to choose from."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

import experiments  # noqa: F401  registers conf/train.yaml's ${run_suffix:} resolver

CONF = Path(__file__).resolve().parent.parent / "conf"


def _compose(overrides=(), hydra_cfg=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_cfg)


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_"), "experiment files are global diffs"
    assert "python -m experiments." in text, "the header gives the command that runs it"
    cfg = _compose([f"experiment={experiment}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    base = f"{cfg.backbone.name}__{cfg.adapter.name}__{cfg.regime.name}__r{cfg.adapter.r}__s{cfg.seed}"
    # + a suffix for whatever else the experiment sets (experiments/naming.py; tests/test_naming.py)
    assert resolved["run_name"] == base or resolved["run_name"].startswith(base + "__")


@pytest.mark.parametrize("group", ["backbone", "regime", "adapter", "logger"])
def test_every_group_option_composes(group):
    for option in _options(group):
        cfg = _compose([f"{group}={option}"])
        OmegaConf.to_container(cfg, resolve=True)
        assert cfg[group].name == option


def test_backbones_name_targets_and_a_source():
    for option in _options("backbone"):
        b = _compose([f"backbone={option}"]).backbone
        assert b.target_modules and b.head_modules and b.kind in ("decoder", "encoder", "vit")
        assert b.get("hub") or b.get("path") or b.get("tiny"), option


def test_table1_rows_exist():
    rows = {"lora16", "randlora10", "lrlora16", "lora32", "randlora5", "lrlora32"}
    assert {f"qwen2_cs170k_{r}" for r in rows} <= set(_options("experiment"))
    cfg = _compose(["experiment=qwen2_cs170k_lrlora32"])
    assert (cfg.backbone.name, cfg.regime.name, cfg.adapter.name, cfg.adapter.r) == \
        ("qwen2_0.5b", "commonsense_170k", "lrlora", 32)


def test_paper_training_defaults_table10():
    llm = _compose(["regime=commonsense_170k"]).regime
    glue = _compose(["regime=sst2"]).regime
    vision = _compose(["regime=cifar100"]).regime
    assert (llm.adapter_dropout, glue.adapter_dropout, vision.adapter_dropout) == (0.05, 0.10, 0.0)
    assert (llm.train.weight_decay, glue.train.weight_decay, vision.train.weight_decay) == (0.0, 0.01, 0.1)
    assert (llm.train.schedule, glue.train.schedule, vision.train.schedule) == ("linear", "linear", "cosine")
    assert (llm.train.warmup_ratio, glue.train.warmup_ratio, vision.train.warmup_ratio) == (0.10, 0.06, 0.10)
    assert (llm.train.batch_size, glue.train.batch_size, vision.train.batch_size) == (16, 32, 128)
    assert (llm.train.patience, glue.train.patience, vision.train.patience) == (2, 3, 5)
    assert (llm.train.precision, glue.train.precision, vision.train.precision) == ("bf16", "fp16", "fp16")
    lr = _compose(["adapter=lrlora"]).adapter
    assert (lr.K, lr.L, lr.amplitude_init, lr.bandwidth_init, lr.center) == (50, 3.0, "zero", 1.0, False)


@pytest.mark.parametrize("sweep", _options("sweep"))
def test_sweeps_compose_as_multirun(sweep):
    cfg = _compose([f"sweep={sweep}"], hydra_cfg=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params  # sweeps something (adapter settings, or the regime for the pilot)


def test_slurm_launcher_composes():
    cfg = _compose(["hydra/launcher=slurm"], hydra_cfg=True)
    assert "submitit" in cfg.hydra.launcher._target_.lower()
    assert cfg.hydra.launcher.gpus_per_node == 1


def test_wrong_group_name_lists_the_options():
    with pytest.raises(MissingConfigException) as e:
        _compose(["backbone=qwen3_0.5b"])
    assert "Available options" in str(e.value) and "qwen2_0.5b" in str(e.value)


def test_each_grid_is_written_once():
    """A sweep's grid lives in its conf/sweep file only: no two sweep files write the same hydra.sweeper.params
    (conf/sweep/rank.yaml reads Table 12's), and analysis/scales.yaml's tables read the sweeps (`sweep: tableN`)
    and write each override list once (Table 3's LoRA baseline is Table 1's row, by anchor)."""
    import re

    import yaml

    written = {}
    for path in sorted((CONF / "sweep").glob("*.yaml")):
        params = ((yaml.safe_load(path.read_text()).get("hydra") or {}).get("sweeper") or {}).get("params")
        if params:
            key = tuple(sorted((k, str(v)) for k, v in params.items()))
            assert key not in written, f"{path.name} writes the grid of {written[key]} again"
            written[key] = path.name
    tables = (CONF.parent / "analysis" / "scales.yaml").read_text().split("\ntables:", 1)[1].split("\nreproduction:")[0]
    lists = re.findall(r"\[[^\[\]]+\]", tables)
    assert lists and len(lists) == len(set(lists)), sorted(x for x in lists if lists.count(x) > 1)
    spec = yaml.safe_load((CONF.parent / "analysis" / "scales.yaml").read_text())["tables"]
    for table in ("table3", "table12", "table13", "table20", "table23"):
        assert spec[table]["sweep"] == table and (CONF / "sweep" / f"{table}.yaml").is_file()
