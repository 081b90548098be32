"""PARA: the cheap spectrum, the one global threshold, and adapters that PEFT loads.

    .venv/bin/python -m pytest -q tests/test_para.py
"""

import json

import pytest
import torch
from peft import PeftModel

from baselines import apply_adapter, load_adapted
from baselines.para import Spectrum, allocate, compress_handle, compress_peft_lora, lora_spectrum
from experiments.para import para_folder
from lrlora.errors import ConfigError
from tests.tiny_models import ENCODER_TARGETS, tiny_encoder

TARGETS = ENCODER_TARGETS + ["intermediate.dense"]


def test_lora_spectrum_equals_dense_svd():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 40, generator=g).double(), torch.randn(30, 6, generator=g).double()
    u, s, vh = lora_spectrum(A, B, 0.5)
    dense = 0.5 * (B @ A)
    torch.testing.assert_close(s, torch.linalg.svdvals(dense)[:6])
    torch.testing.assert_close(u @ torch.diag(s) @ vh, dense)


def _spectra(values: dict[str, list[float]], d=(8, 8)):
    return {n: Spectrum(d[0], d[1], torch.eye(d[1], len(v)).double(), torch.tensor(v).double(),
                        torch.eye(len(v), d[0]).double(), len(v) * sum(d)) for n, v in values.items()}


def test_keep_energy_threshold_is_global_and_minimal():
    sp = _spectra({"a": [4.0, 1.0, 0.5], "b": [3.0, 0.2, 0.1], "c": [0.05, 0.01, 0.0]})
    res = allocate(sp, keep_energy=0.95)
    assert res.ranks_after == {"a": 1, "b": 1, "c": 0}  # Σσ² = 26.30; 16 + 9 = 25 is 95.05%
    res = allocate(sp, keep_energy=0.9)
    assert res.ranks_after == {"a": 1, "b": 1, "c": 0}
    assert res.energy_kept >= 0.9
    res = allocate(sp, keep_energy=0.96)
    assert res.ranks_after == {"a": 2, "b": 1, "c": 0}  # 95.05% < 96%: the next σ (1.0) joins, 98.9%
    kept = [s for n, v in sp.items() for s in v.S[: res.ranks_after[n]].tolist()]
    dropped = [s for n, v in sp.items() for s in v.S[res.ranks_after[n]:].tolist()]
    assert min(kept) >= max(dropped)
    assert res.params_after == 3 * 16 and res.params_before == 9 * 16


def test_reduction_target_is_met():
    sp = _spectra({"a": [4.0, 1.0, 0.5, 0.4], "b": [3.0, 0.2, 0.1, 0.05]})
    for red in (0.0, 0.5, 0.75, 0.9):
        res = allocate(sp, reduction=red)
        assert res.reduction >= red - 1e-12
    assert allocate(sp, reduction=0.75).ranks_after == {"a": 1, "b": 1}


def test_bad_arguments():
    sp = _spectra({"a": [1.0]})
    with pytest.raises(ValueError):
        allocate(sp)
    with pytest.raises(ValueError):
        allocate(sp, keep_energy=0.9, reduction=0.5)
    with pytest.raises(ValueError):
        allocate(sp, keep_energy=1.5)


def _trained_lora(tmp_path, zero_module="bert.encoder.layer.1.attention.self.value"):
    """A tiny LoRA adapter with random (non-zero) factors, one module left at ΔW = 0 (-> rank 0)."""
    torch.manual_seed(3)
    handle = apply_adapter(tiny_encoder(), name="lora", r=4, target_modules=TARGETS, modules_to_save=["classifier"])
    with torch.no_grad():
        for n, p in handle.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * (0.0 if zero_module in n else torch.rand(()).item()))
    handle.save(tmp_path / "lora")
    return handle


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_peft_loads_the_compressed_adapter_and_rank_zero_layers_are_dropped(tmp_path):
    handle = _trained_lora(tmp_path)
    ids = torch.randint(0, 128, (2, 10))
    full = _logits(handle.model, ids)
    res = compress_peft_lora(tmp_path / "lora", tmp_path / "p100", keep_energy=1.0)
    assert res.ranks_after["bert.encoder.layer.1.attention.self.value"] == 0
    cfg = json.loads((tmp_path / "p100" / "adapter_config.json").read_text())
    assert "bert.encoder.layer.1.attention.self.value" not in cfg["target_modules"]
    loaded = PeftModel.from_pretrained(tiny_encoder(), str(tmp_path / "p100"))
    torch.testing.assert_close(_logits(loaded, ids), full, rtol=1e-4, atol=1e-5)  # nothing dropped but zeros
    for name, module in loaded.named_modules():
        if name.endswith("layer.0.intermediate.dense"):
            assert module.lora_A["default"].weight.shape[0] == res.ranks_after["bert.encoder.layer.0.intermediate.dense"]

    res = compress_peft_lora(tmp_path / "lora", tmp_path / "p50", keep_energy=0.5)
    assert res.params_after < res.params_before and res.energy_kept >= 0.5
    assert len(set(res.ranks_after.values())) > 1  # per-layer ranks, not uniform
    loaded = PeftModel.from_pretrained(tiny_encoder(), str(tmp_path / "p50"))
    assert torch.isfinite(_logits(loaded, ids)).all()
    assert not torch.allclose(_logits(loaded, ids), full)


def test_cli_keep_energy_and_reduction(tmp_path, capsys):
    _trained_lora(tmp_path)
    res_e90 = para_folder(tmp_path / "lora", tmp_path / "e90", keep_energy=0.9)  # python -m experiments.para adapter_dir=
    out = capsys.readouterr().out
    assert "fewer" in out and "bert.encoder.layer.0.attention.self.query" in out
    assert res_e90.energy_kept >= 0.9
    res = para_folder(tmp_path / "lora", tmp_path / "r75", reduction=0.75)
    assert res.reduction >= 0.75
    for d in ("e90", "r75"):
        PeftModel.from_pretrained(tiny_encoder(), str(tmp_path / d))
    handle = load_adapted(tiny_encoder(), tmp_path / "e90")  # the harness's way in works too
    assert handle.trainable_parameters() == res_e90.params_after


def test_lrlora_exports_to_plain_lora(tmp_path):
    torch.manual_seed(4)
    handle = apply_adapter(tiny_encoder(), name="lrlora", r=4, K=10, target_modules=TARGETS,
                           modules_to_save=["classifier"])
    with torch.no_grad():  # a trained-looking state: σ ≠ 0, B ≠ 0
        for n, p in handle.model.named_parameters():
            if p.requires_grad and "classifier" not in n:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 128, (2, 10))
    ref = _logits(handle.model, ids)
    res = compress_handle(handle, tmp_path / "exact", keep_energy=1.0)
    loaded = PeftModel.from_pretrained(tiny_encoder(), str(tmp_path / "exact"))
    torch.testing.assert_close(_logits(loaded, ids), ref, rtol=1e-4, atol=1e-4)
    assert res.energy_kept == pytest.approx(1.0)
    res90 = compress_handle(handle, tmp_path / "e90", keep_energy=0.9)
    assert 0.9 <= res90.energy_kept < 1.0
    assert sum(res90.ranks_after.values()) < sum(res.ranks_after.values())
    PeftModel.from_pretrained(tiny_encoder(), str(tmp_path / "e90"))


def test_cli_exports_a_saved_lrlora_adapter_given_its_base_model(tmp_path, capsys):
    base = tiny_encoder()
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(5)
    handle = apply_adapter(base, name="lrlora", r=4, K=10, target_modules=ENCODER_TARGETS,
                           modules_to_save=["classifier"])
    with torch.no_grad():
        for n, p in handle.model.named_parameters():
            if p.requires_grad and "classifier" not in n:
                p.add_(torch.randn_like(p) * 0.1)
    handle.save(tmp_path / "lr")
    with pytest.raises(ConfigError, match="pass base_model=PATH"):  # not a LoRA: the base model forms ΔW
        para_folder(tmp_path / "lr", tmp_path / "x", keep_energy=0.9)
    res = para_folder(tmp_path / "lr", tmp_path / "e90", keep_energy=0.9, base_model=str(tmp_path / "base"),
                      num_labels=3)
    assert res.energy_kept >= 0.9 and "energy kept" in capsys.readouterr().out
    PeftModel.from_pretrained(tiny_encoder(), str(tmp_path / "e90"))
