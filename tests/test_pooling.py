"""backbone.pooling (experiments/backbones.py): an encoder's classification head reads [CLS] through the model's
own pooler (`cls`, the default) or the mean of the last hidden state over the real tokens (`mean`), in training
and wherever a saved run is re-scored; a run made before the option keeps its name, and a bad value is one
`error:` line. Tiny random models, CPU, seconds."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments import hydra_cli
from experiments.backbones import _mean_pool_hook, build_backbone, check_pooling, masked_mean, pool_mean
from experiments.train import run
from lrlora.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
TINY = ["backbone=tiny_encoder", "regime=bbc_news", "adapter.r=2", "logger=none", "trainer.max_steps=2",
        "trainer.progress=false", "trainer.num_threads=1", "regime.n_train=16", "regime.n_val=8", "regime.n_test=8",
        "regime.max_length=32", "regime.train.batch_size=8"]
TEXTS = ["a short one", "a somewhat longer sentence, with a few more words in it"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def tiny(pooling):
    cfg = composed("backbone=tiny_encoder", f"backbone.pooling={pooling}")
    model, tok = build_backbone(cfg.backbone, "classification", 5)
    return model.eval(), tok


@torch.no_grad()
def test_mean_pooling_reads_the_real_tokens_only_and_is_not_cls():
    cls_model, tok = tiny("cls")
    mean_model, _ = tiny("mean")
    # the same weights, under the same names (adapters find their targets by name; classifier is modules_to_save)
    assert [n for n, _ in mean_model.named_parameters()] == [n for n, _ in cls_model.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(mean_model.parameters(), cls_model.parameters()))
    short = tok(TEXTS, padding=True, return_tensors="pt")
    long = tok(TEXTS, padding="max_length", max_length=short["input_ids"].shape[1] + 9, return_tensors="pt")
    mean = mean_model(**short).logits
    torch.testing.assert_close(mean_model(**long).logits, mean, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mean, cls_model(**short).logits, atol=1e-3), "mean must not be the CLS head"
    # what it computes: the masked mean of the last hidden state, through the model's dropout and classifier
    hidden = mean_model.bert(**short).last_hidden_state
    m = short["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(mean, mean_model.classifier((hidden * m).sum(1) / m.sum(1)))
    # no attention mask: every position counts, as the model itself reads a call without one
    torch.testing.assert_close(masked_mean(hidden, None), hidden.mean(1))


@torch.no_grad()
def test_roberta_mean_feeds_its_own_head_the_mean():
    """RoBERTa's head (dense, tanh, out_proj: `classifier`) reads the <s> vector; with mean it reads the mean."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3)).eval()
    ids, mask = torch.randint(3, 100, (2, 7)), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    cls_logits = model(input_ids=ids, attention_mask=mask).logits
    pool_mean(model)
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(logits, cls_logits, atol=1e-4)
    padded = torch.cat([ids, torch.ones(2, 5, dtype=torch.long)], 1)  # RoBERTa's pad id is 1
    torch.testing.assert_close(model(input_ids=padded, attention_mask=torch.cat([mask, torch.zeros(2, 5)], 1)).logits,
                               logits, atol=1e-5, rtol=1e-5)
    hidden = model.roberta(input_ids=ids, attention_mask=mask).last_hidden_state  # position 0: the mean now
    torch.testing.assert_close(logits, model.classifier(hidden[:, :1]))


def test_the_hook_reads_tuples_too():
    """transformers 4.x encoders may return tuples (return_dict=False): the same slots are replaced."""
    hidden, mask = torch.randn(2, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    out = _mean_pool_hook("pooler_output", None, (), {"attention_mask": mask}, (hidden, torch.zeros(2, 4)))
    torch.testing.assert_close(out[1], masked_mean(hidden, mask))
    out = _mean_pool_hook("last_hidden_state", None, (None, mask), {}, (hidden,))
    torch.testing.assert_close(out[0][:, 0], masked_mean(hidden, mask))
    torch.testing.assert_close(out[0][:, 1:], hidden[:, 1:])


@pytest.mark.parametrize("adapter", ["lora", "lrlora"])
def test_a_mean_pooled_run_trains_its_classifier_and_is_rescored_with_mean(tmp_path, adapter):
    from baselines import load_adapted
    from experiments.evaluate import score_adapter
    from experiments.protocols import protocol_config

    cfg = composed(*TINY, f"adapter={adapter}", "backbone.pooling=mean", f"paths.root={tmp_path}")
    assert cfg.run_name != composed(*TINY, f"adapter={adapter}", f"paths.root={tmp_path}").run_name
    res = run(cfg)
    on_disk = json.loads((tmp_path / "results" / f"{res['run_name']}.json").read_text())
    assert on_disk["config"]["backbone"]["pooling"] == "mean" and on_disk["metrics"]["train"]["steps"] == 2
    assert on_disk["params"]["head"] > 0

    def fresh(c):
        torch.manual_seed(c.seed)
        return build_backbone(c.backbone, "classification", 5)[0]

    saved = load_adapted(fresh(cfg), tmp_path / res["adapter_dir"]).model.state_dict()
    trained = [v for k, v in saved.items() if k.endswith("classifier.modules_to_save.default.weight")]
    assert len(trained) == 1 and not torch.equal(trained[0], fresh(cfg).classifier.weight), "the head trained"

    # re-scoring the saved run (experiments.evaluate) builds the backbone from its config: mean again
    def rescored(c):
        metrics, _ = score_adapter(tmp_path / res["adapter_dir"], c, {"glue": protocol_config("glue", None)},
                                   tmp_path / "rescore", res["run_name"], batch_size=16, device="cpu")
        return metrics["glue"]["loss"]

    assert rescored(cfg) == pytest.approx(res["metrics"]["glue"]["loss"], abs=1e-5)
    as_cls = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    as_cls.backbone.pooling = "cls"
    assert rescored(as_cls) != pytest.approx(res["metrics"]["glue"]["loss"], abs=1e-5), "the test can fail"


def test_default_names_are_those_of_before_and_mean_has_its_own():
    """backbone.pooling=cls is in experiments.identity.ADDED: today's names are the names of before the option."""
    assert composed().run_name == "minilm_l6__lrlora__bbc_news__r16__s42"
    assert composed("backbone=tiny_encoder").run_name == "tiny_encoder__lrlora__bbc_news__r16__s42"
    assert composed("backbone.pooling=mean").run_name == "minilm_l6__lrlora__bbc_news__r16__s42__pooling=mean"
    assert composed("backbone=roberta_base", "backbone.pooling=cls").run_name == \
        "roberta_base__lrlora__bbc_news__r16__s42"


BAD = [
    (["backbone=tiny_encoder", "backbone.pooling=max"], r"^error: backbone\.pooling='max' must be one of cls, mean"),
    (["backbone=tiny_decoder", "regime=bbc_news", "+backbone.pooling=mean"],
     r"^error: backbone\.pooling=mean pools an encoder's .* tiny_decoder is a decoder.*: drop backbone\.pooling"),
    (["backbone=tiny_vit", "regime=synthetic_images", "+backbone.pooling=mean"], r"^error: .* tiny_vit is a vit"),
    (["backbone=tiny_decoder", "backbone.pooling=mean"], r"^error: backbone\.pooling is not a setting"),
    (["backbone=tiny_encoder", "regime=bbc_news_gen", "backbone.pooling=mean"],
     r"^error: backbone\.pooling=mean pools a sequence-classification head.* causal_lm"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=["value", "decoder", "vit", "decoder-hydra", "task"])
def test_a_pooling_that_cannot_be_is_one_error_line_and_writes_nothing(tmp_path, capsys, argv, message):
    import re

    from experiments import train

    code = hydra_cli.call_hydra(train.main, CONF, "train", [*argv, "logger=none", f"paths.root={tmp_path}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and re.search(message, lines[0]), lines
    assert not any(tmp_path.iterdir())


def test_what_the_checks_refuse_directly():
    enc = OmegaConf.create({"name": "e", "kind": "encoder"})
    assert check_pooling(enc, "classification") == "cls"  # absent: the model's own head
    assert check_pooling(OmegaConf.create({"name": "d", "kind": "decoder", "pooling": "cls"}), "causal_lm") == "cls"
    for bad in ("CLS", None, 1):
        with pytest.raises(ConfigError, match="must be one of cls, mean"):
            check_pooling(OmegaConf.create({"name": "e", "kind": "encoder", "pooling": bad}), "classification")
    with pytest.raises(ConfigError, match="implemented for BERT and RoBERTa .* not Linear: use backbone.pooling=cls"):
        pool_mean(torch.nn.Linear(2, 2))
