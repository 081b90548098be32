"""LR-LoRA as a PEFT method (`lrlora.peft`): PEFT's generic expectations over tiny decoder, encoder and ViT models.

    .venv/bin/python -m pytest -q tests/test_peft_method.py

The table CASES (model × config) runs every invariant PEFT checks for its own methods on custom models
(tests/test_custom_models.py there): forward finite, merged = unmerged, save/load exact, disable_adapter = base,
only adapter parameters train, modules_to_save trains and saves the head, unload gives the base back. Configs use
amplitude_init="random" so that ΔW ≠ 0 from the start (with the paper's a = 0, ΔW = 0 and most checks are void).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import ViTConfig, ViTForImageClassification

import lrlora.peft as lp
from lrlora import LRLoRAConfig, apply_lrlora, load_adapter, lrlora_modules, save_adapter
from tests.tiny_models import DECODER_TARGETS, ENCODER_TARGETS, tiny_decoder, tiny_encoder

RANDOM = dict(amplitude_init="random", amplitude_init_std=0.3)


def tiny_vit(num_labels: int = 3, seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=num_labels, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg).eval()


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 128, (4, 10), generator=g)}


def _decoder_batch():
    b = _tokens()
    return {**b, "labels": b["input_ids"].clone()}


def _encoder_batch():
    return {**_tokens(), "labels": torch.tensor([0, 1, 2, 1])}


def _vit_batch():
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "labels": torch.tensor([0, 1, 2, 1])}


# model name -> (builder, batch, target_modules, head for modules_to_save)
MODELS = {
    "llama": (tiny_decoder, _decoder_batch, DECODER_TARGETS, None),
    "bert": (tiny_encoder, _encoder_batch, ENCODER_TARGETS + ["intermediate.dense"], "classifier"),
    "vit": (tiny_vit, _vit_batch, ["q_proj", "v_proj", "fc1"], "classifier"),
}
CONFIGS = {
    "sinc": dict(r=4, **RANDOM),
    "center_dropout": dict(r=2, center=True, dropout=0.1, **RANDOM),
    "gaussian_fixed_w": dict(r=4, basis="gaussian", learn_bandwidth=False, K=10, **RANDOM),
    "share_all_by_type": dict(r=4, share="all", share_by="module_type", learn_grid=True, **RANDOM),
    "odd_layers": dict(r=4, layers_to_transform="odd", pre_scale=2.0, post_scale=0.5, **RANDOM),
}
CASES = [(m, c) for m in MODELS for c in CONFIGS]


def _build(model_name, config_name, head=True, seed=0):
    builder, batch, targets, head_name = MODELS[model_name]
    base = builder(seed=seed)
    kw = dict(CONFIGS[config_name], target_modules=targets)
    if head and head_name:
        kw["modules_to_save"] = [head_name]
    return base, batch(), kw


def _out(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


def _peft(model_name, config_name, head=True, seed=0):
    base, batch, kw = _build(model_name, config_name, head, seed)
    torch.manual_seed(1)
    return get_peft_model(base, lp.LRLoRAPeftConfig(**kw)), batch, kw


def _load_clean(base, directory):
    """PeftModel.from_pretrained, failing on any PEFT warning (e.g. "Found missing adapter keys")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base, directory).eval()
    peft_warnings = [str(w.message) for w in caught if "peft" in w.filename or "lrlora" in w.filename]
    assert not peft_warnings, peft_warnings
    return loaded


# --- the generic table ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name,config_name", CASES)
def test_forward_finite_and_adapter_changes_output(model_name, config_name):
    model, batch, _ = _peft(model_name, config_name)
    model.eval()
    out = _out(model, batch)
    assert torch.isfinite(out).all()
    with model.disable_adapter():
        base = _out(model, batch)
    assert not torch.allclose(out, base), "ΔW ≠ 0 with random amplitudes: the adapter must change the output"


@pytest.mark.parametrize("model_name,config_name", CASES)
def test_disable_adapter_gives_the_base_output(model_name, config_name):
    base, batch, kw = _build(model_name, config_name)
    reference = _out(copy.deepcopy(base), batch)
    model = get_peft_model(base, lp.LRLoRAPeftConfig(**kw)).eval()
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, batch), reference, rtol=0, atol=0)
    model.merge_adapter()
    with model.disable_adapter():  # disabling a merged adapter unmerges it (as LoRA does)
        torch.testing.assert_close(_out(model, batch), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name,config_name", CASES)
def test_merge_equals_unmerged_and_unmerge_restores(model_name, config_name):
    model, batch, _ = _peft(model_name, config_name)
    model.eval()
    out = _out(model, batch)
    model.merge_adapter()
    torch.testing.assert_close(_out(model, batch), out, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(_out(model, batch), out, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, lp.LRLoRALayer) for m in merged.modules())
    assert not lrlora_modules(merged)
    torch.testing.assert_close(_out(merged, batch), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name,config_name", CASES)
def test_save_load_round_trip_exact(model_name, config_name, tmp_path):
    model, batch, _ = _peft(model_name, config_name)
    model.eval()
    out = _out(model, batch)
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LRLORA"
    fresh, _, _ = _build(model_name, config_name, seed=0)
    loaded = _load_clean(fresh, tmp_path)
    torch.testing.assert_close(_out(loaded, batch), out, rtol=0, atol=0)


@pytest.mark.parametrize("model_name,config_name", CASES)
def test_only_adapter_params_and_head_train(model_name, config_name):
    model, batch, kw = _peft(model_name, config_name)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "something must train"
    for n in trainable:
        assert ".lrlora_layer." in n or ".modules_to_save." in n, n
    # exactly what the library trains (e.g. a fixed bandwidth stays frozen under PEFT's set_adapter)
    base, _, _ = _build(model_name, config_name)
    library = apply_lrlora(base, LRLoRAConfig(**kw))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        sum(p.numel() for p in library.parameters() if p.requires_grad)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(".lrlora_layer." in n for n in changed)
    if MODELS[model_name][3]:  # the new head is trained (its copy), the original stays
        assert any(".modules_to_save." in n for n in changed)
        assert not any(".original_module." in n for n in changed)


@pytest.mark.parametrize("model_name", ["bert", "vit"])
def test_modules_to_save_head_is_saved_and_restored(model_name, tmp_path):
    model, batch, _ = _peft(model_name, "sinc")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(1.0)  # a head unlike the fresh model's
    model.eval()
    out = _out(model, batch)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in keys
    fresh, _, _ = _build(model_name, "sinc")
    torch.nn.init.normal_(fresh.classifier.weight)  # another head: the saved one must replace it
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(_out(loaded, batch), out, rtol=0, atol=0)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_unload_gives_the_base_model_back(model_name):
    base, batch, kw = _build(model_name, "sinc", head=False)
    reference = _out(copy.deepcopy(base), batch)
    model = get_peft_model(base, lp.LRLoRAPeftConfig(**kw))
    plain = model.unload()
    assert not any(isinstance(m, lp.LRLoRALayer) for m in plain.modules())
    torch.testing.assert_close(_out(plain, batch), reference, rtol=0, atol=0)


# --- PEFT equals the library ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name,config_name", CASES)
def test_peft_output_equals_library_and_folders_convert_exactly(model_name, config_name, tmp_path):
    """PEFT folder -> library folder -> library model: the same outputs bit for bit; and back to the same tensors."""
    model, batch, kw = _peft(model_name, config_name)
    model.eval()
    out = _out(model, batch)
    model.save_pretrained(tmp_path / "peft")
    lp.peft_to_library(tmp_path / "peft", tmp_path / "lib")
    base, _, _ = _build(model_name, config_name)
    library = load_adapter(base, tmp_path / "lib").eval()
    torch.testing.assert_close(_out(library, batch), out, rtol=0, atol=0)
    lp.library_to_peft(tmp_path / "lib", tmp_path / "peft2")
    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "peft2" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_library_folder_to_peft_loads_exactly(tmp_path):
    base, batch, kw = _build("bert", "share_all_by_type")
    torch.manual_seed(3)
    library = apply_lrlora(base, LRLoRAConfig(**kw)).eval()
    out = _out(library, batch)
    save_adapter(library, tmp_path / "lib")
    lp.library_to_peft(tmp_path / "lib", tmp_path / "peft", task_type="SEQ_CLS")
    fresh, _, _ = _build("bert", "share_all_by_type")
    loaded = _load_clean(fresh, tmp_path / "peft")
    torch.testing.assert_close(_out(loaded, batch), out, rtol=0, atol=0)
    # shared σ stays shared after loading: the query layers hold fewer distinct tensors than parameter slots
    ids = [id(p) for n, m in loaded.named_modules() if isinstance(m, lp.LRLoRALayer) and n.endswith(".query")
           for p in m.lrlora_layer["default"].parameters()]
    assert len(set(ids)) < len(ids)


def test_config_has_the_library_fields_and_defaults():
    import dataclasses

    peft_defaults = lp.LRLoRAPeftConfig()
    lib_defaults = LRLoRAConfig()
    for f in dataclasses.fields(LRLoRAConfig):
        assert getattr(peft_defaults, f.name) == getattr(lib_defaults, f.name), f.name
    assert peft_defaults.peft_type == "LRLORA"
    with pytest.raises(ValueError, match="unknown basis"):
        lp.LRLoRAPeftConfig(basis="nope")


def test_errors_are_the_library_ones():
    with pytest.raises(ValueError, match="Did you mean"):
        get_peft_model(tiny_encoder(), lp.LRLoRAPeftConfig(target_modules=["qurey"]))
    with pytest.raises(ValueError, match="exceeds min"):
        get_peft_model(tiny_encoder(), lp.LRLoRAPeftConfig(r=100, target_modules=["query"]))


# --- several adapters -------------------------------------------------------------------------------------------------
def test_named_adapters_set_adapter_and_delete(tmp_path):
    base, batch, kw = _build("llama", "sinc", head=False)
    model = get_peft_model(base, lp.LRLoRAPeftConfig(**kw)).eval()
    torch.manual_seed(7)
    model.add_adapter("other", lp.LRLoRAPeftConfig(**{**kw, "r": 2, "target_modules": ["q_proj", "v_proj"]}))
    out_default = _out(model, batch)
    model.set_adapter("other")
    out_other = _out(model, batch)
    assert not torch.allclose(out_default, out_other)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other." in n for n in trainable)
    model.save_pretrained(tmp_path)  # default in tmp_path, the other in tmp_path/other
    fresh, _, _ = _build("llama", "sinc", head=False)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    loaded.load_adapter(tmp_path / "other", adapter_name="second")
    torch.testing.assert_close(_out(loaded, batch), out_default, rtol=0, atol=0)
    loaded.set_adapter("second")
    torch.testing.assert_close(_out(loaded, batch), out_other, rtol=0, atol=0)
    model.delete_adapter("other")
    model.set_adapter("default")
    torch.testing.assert_close(_out(model, batch), out_default, rtol=0, atol=0)


def test_convert_to_lora_through_peft(tmp_path):
    """PEFT's own LoRA export takes LR-LoRA (ΔW is a dense update of W0)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.tuners.lora import convert_to_lora

    model, batch, _ = _peft("llama", "sinc", head=False)
    model.eval()
    out = _out(model, batch)
    lora_config, state = convert_to_lora(model, rank=32)  # full rank on 64-wide layers: exact up to rounding
    fresh, _, _ = _build("llama", "sinc", head=False)
    lora_kwargs = {k: v for k, v in lora_config.to_dict().items() if k in LoraConfig.__dataclass_fields__}
    lora = get_peft_model(fresh, LoraConfig(**{**lora_kwargs, "layers_to_transform": None}))
    set_peft_model_state_dict(lora, state)
    torch.testing.assert_close(_out(lora.eval(), batch), out, rtol=1e-3, atol=1e-3)


def test_import_lrlora_does_not_import_peft():
    code = "import sys, lrlora; assert 'peft' not in sys.modules, 'lrlora imported peft'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_method_registry_does_not_import_peft():
    """analysis reads method labels from the registry: that must not cost a PEFT import."""
    code = ("import sys, baselines; labels = {n: c.label for n, c in baselines.methods().items()}; "
            "assert labels['lrlora'] == 'LR-LoRA' and labels['lora'] == 'LoRA', labels; "
            "assert 'peft' not in sys.modules, 'reading the registry imported peft'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_peft_layer_calls_the_fused_op_and_holds_no_library_layer():
    from lrlora import LRLoRALinear
    from lrlora.layer import LRLoRAAdapter

    model, batch, _ = _peft("llama", "center_dropout", head=False)
    assert not any(isinstance(m, LRLoRALinear) for m in model.modules())
    layers = [m for m in model.modules() if isinstance(m, lp.LRLoRALayer)]
    assert layers and all(isinstance(m.lrlora_layer["default"], LRLoRAAdapter) for m in layers)
    assert all("base_layer" not in dict(m.lrlora_layer["default"].named_modules()) for m in layers)
    x = torch.randn(2, 3, layers[0].in_features, requires_grad=True)
    for mode in (model.train, model.eval):  # with dropout (the sparse or masked form) and merged form
        mode()
        assert type(layers[0](x).grad_fn).__name__.startswith("LRLoRALinearFunction")


# --- transformers.Trainer -------------------------------------------------------------------------------------------
def test_trainer_lowers_the_loss_and_its_checkpoint_reloads(tmp_path):
    from transformers import Trainer, TrainingArguments

    base, _, kw = _build("bert", "center_dropout")
    model = get_peft_model(base, lp.LRLoRAPeftConfig(**{**kw, "amplitude_init": "zero", "dropout": 0.0}))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (32, 8), generator=g)
    data = [{"input_ids": ids[i], "labels": int(ids[i, 0]) % 3} for i in range(32)]
    eval_batch = {"input_ids": ids, "labels": torch.tensor([d["labels"] for d in data])}

    def loss():
        model.eval()
        with torch.no_grad():
            return model(**eval_batch).loss.item()

    before = loss()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=16,
                             learning_rate=1e-2, save_steps=30, report_to=[], use_cpu=True, logging_steps=10,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    after = loss()
    assert after < before - 0.05, (before, after)
    ckpt = tmp_path / "checkpoint-30"
    assert (ckpt / "adapter_model.safetensors").is_file()
    fresh, _, _ = _build("bert", "center_dropout")
    reloaded = PeftModel.from_pretrained(fresh, ckpt).eval()
    model.eval()
    torch.testing.assert_close(_out(reloaded, eval_batch), _out(model, eval_batch), rtol=0, atol=0)


def test_training_through_peft_follows_the_library_exactly():
    """Same seed, same init, same steps: the PEFT model trains exactly as apply_lrlora's (so results measured with
    the library, e.g. the demo, hold for adapter=lrlora through PEFT)."""
    kw = dict(r=4, K=10, center=True, target_modules=ENCODER_TARGETS, modules_to_save=["classifier"])
    batch = _encoder_batch()
    models = []
    for wrap in (lambda m: apply_lrlora(m, LRLoRAConfig(**kw)), lambda m: get_peft_model(m, lp.LRLoRAPeftConfig(**kw))):
        torch.manual_seed(0)
        model = wrap(tiny_encoder())
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for _ in range(3):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        models.append(model.eval())
    torch.testing.assert_close(_out(models[1], batch), _out(models[0], batch), rtol=0, atol=0)


def test_harness_entry_is_peft_and_loads_library_folders(tmp_path):
    """adapter=lrlora builds a PeftModel; a folder in the library's format (older runs) still loads, exactly."""
    from baselines import apply_adapter, load_adapted
    from baselines.core import META_FILE

    kw = dict(r=4, K=10, target_modules=ENCODER_TARGETS, modules_to_save=["classifier"], **RANDOM)
    handle = apply_adapter(tiny_encoder(), name="lrlora", **kw)
    assert isinstance(handle.model, PeftModel)
    batch = _encoder_batch()
    library = apply_lrlora(tiny_encoder(), LRLoRAConfig(**kw)).eval()
    save_adapter(library, tmp_path / "old")
    (tmp_path / "old" / META_FILE).write_text(json.dumps({"name": "lrlora", "kwargs": kw}))
    loaded = load_adapted(tiny_encoder(), tmp_path / "old").model.eval()
    torch.testing.assert_close(_out(loaded, batch), _out(library, batch), rtol=0, atol=0)


def test_conversion_cli_round_trip_and_bad_input(tmp_path, capsys):
    model, _, _ = _peft("bert", "sinc")
    model.save_pretrained(tmp_path / "peft")
    lp.main(["to-library", str(tmp_path / "peft"), str(tmp_path / "lib")])
    lp.main(["to-peft", str(tmp_path / "lib"), str(tmp_path / "peft2"), "--task-type", "SEQ_CLS"])
    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "peft2" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from lrlora import cli

    capsys.readouterr()
    for command, src in (("to-library", tmp_path / "missing"), ("to-peft", tmp_path / "peft"),
                         ("to-library", tmp_path / "lib")):  # as `python -m lrlora.peft` runs main (cli.run)
        assert cli.call(lp.main, [command, str(src), str(tmp_path / "out")]) == cli.EXIT_USER
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_causal_lm_generate_matches_the_merged_model():
    base, batch, kw = _build("llama", "sinc", head=False)
    model = get_peft_model(base, lp.LRLoRAPeftConfig(**kw, task_type="CAUSAL_LM")).eval()
    prompt = batch["input_ids"][:2, :5]
    out = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
                               out, rtol=0, atol=0)
