"""Method-specific checks of the self-written baselines and the PEFT wrappers' schedules (beyond the generic table).

    .venv/bin/python -m pytest -q tests/test_baselines_methods.py
"""

import math

import pytest
import torch

from baselines import apply_adapter, match_budget, parameter_count
from baselines.budget import budget_percent
from tests.tiny_models import DECODER_TARGETS, ENCODER_TARGETS, tiny_decoder, tiny_encoder


def _fill(handle, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in handle.model.named_parameters():
            if p.requires_grad and "classifier" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_sinelora_delta_is_scaled_sine_of_ba():
    h = apply_adapter(tiny_encoder(), name="sinelora", r=4, lora_alpha=8, omega=30.0, target_modules=["query"])
    _fill(h)
    for name, m in h.layers().items():
        ref = (8 / 4) * torch.sin(30.0 * m.lora_B @ m.lora_A) / math.sqrt(m.in_features)
        torch.testing.assert_close(h.delta_weights()[name], ref)


def test_dylora_trains_a_rank_prefix_and_evaluates_full_rank():
    h = apply_adapter(tiny_encoder(), name="dylora", r=4, lora_alpha=4, target_modules=["query"], seed=1)
    _fill(h)
    m = next(iter(h.layers().values()))
    seen = set()
    for step in range(1, 30):
        h.on_step(step, 30)
        seen.add(m.train_rank)
    assert seen == {1, 2, 3, 4}
    m.train(True)
    m.train_rank = 2
    torch.testing.assert_close(m.delta_weight(), math.sqrt(4 / 2) * m.lora_B[:, :2] @ m.lora_A[:2])
    m.train(False)
    torch.testing.assert_close(m.delta_weight(), m.lora_B @ m.lora_A)
    x = torch.randn(3, m.in_features)
    m.train(True)  # the low-rank forward equals the dense ΔW at the training rank
    torch.testing.assert_close(m(x), m.base_layer(x) + x @ m.delta_weight().T)


def _train(handle, batch, steps, lr=1e-2):
    opt = torch.optim.AdamW([p for p in handle.model.parameters() if p.requires_grad], lr=lr)
    handle.model.train()
    for step in range(1, steps + 1):
        handle.model(**batch).loss.backward()
        opt.step()
        handle.on_step(step, steps)
        opt.zero_grad()


def test_elalora_prunes_and_expands_by_masking_keeping_the_total_rank():
    torch.manual_seed(0)
    h = apply_adapter(tiny_decoder(), name="elalora", r=3, r_max=6, deltaT=2, b_init=2, tinit=0.1, tfinal=0.1,
                      target_modules=DECODER_TARGETS)
    ids = torch.randint(0, 128, (4, 12))
    params_before = [p.shape for p in h.model.parameters() if p.requires_grad]
    _train(h, dict(input_ids=ids, labels=ids), 40)
    ranks = h.extra_results()["ranks"]
    assert sum(ranks.values()) == 3 * len(ranks)  # prune b, expand b: the budget is constant
    assert set(ranks.values()) != {3}  # ... but it moved between modules
    assert max(ranks.values()) <= 6 and min(ranks.values()) >= 1
    assert [p.shape for p in h.model.parameters() if p.requires_grad] == params_before  # never resized
    for m in h.layers().values():  # masked components contribute nothing
        off = m.rank_mask == 0
        with torch.no_grad():
            m.lora_E[off] = 123.0
        dw = m.delta_weight()
        with torch.no_grad():
            m.lora_E[off] = 0.0
        torch.testing.assert_close(dw, m.delta_weight())


def test_adalora_allocates_with_total_step_from_the_run_and_reports_ranks():
    torch.manual_seed(0)
    h = apply_adapter(tiny_decoder(), name="adalora", r=6, target_r=2, tinit=0.2, tfinal=0.2, deltaT=1,
                      target_modules=DECODER_TARGETS)
    ids = torch.randint(0, 128, (4, 12))
    _train(h, dict(input_ids=ids, labels=ids), 20)
    assert h.model.peft_config["default"].total_step == 20
    ranks = h.extra_results()["ranks"]
    assert sum(ranks.values()) == 2 * len(ranks)  # the final budget: target_r per module on average
    assert max(ranks.values()) <= 6


def test_nola_bases_come_from_the_seed_and_module_name():
    a = apply_adapter(tiny_encoder(), name="nola", r=2, num_basis_A=5, num_basis_B=5, target_modules=ENCODER_TARGETS)
    b = apply_adapter(tiny_encoder(), name="nola", r=2, num_basis_A=5, num_basis_B=5, target_modules=ENCODER_TARGETS)
    c = apply_adapter(tiny_encoder(), name="nola", r=2, num_basis_A=5, num_basis_B=5, target_modules=ENCODER_TARGETS,
                      seed=1)
    la, lb, lc = (list(h.layers().values()) for h in (a, b, c))
    assert torch.equal(la[0].basis_A, lb[0].basis_A) and not torch.equal(la[0].basis_A, la[1].basis_A)
    assert not torch.equal(la[0].basis_B, lc[0].basis_B)
    assert "basis_A" not in " ".join(a.adapter_state())  # regenerated, never saved


def test_table1_pairings_on_qwen2_shapes():
    """Qwen2-0.5B's real shapes on the meta device (no weights): LoRA-16 vs LoRA-32, and RandLoRA's matched r."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    lora16 = budget_percent(model, "lora", DECODER_TARGETS, r=16)
    lora32 = budget_percent(model, "lora", DECODER_TARGETS, r=32)
    assert lora32 == pytest.approx(2 * lora16)
    r16 = match_budget(model, "randlora", lora16, DECODER_TARGETS)["r"]
    r32 = match_budget(model, "randlora", lora32, DECODER_TARGETS)["r"]
    assert r32 < r16  # RandLoRA: more parameters at smaller r
    for r, target in ((r16, lora16), (r32, lora32)):
        assert budget_percent(model, "randlora", DECODER_TARGETS, r=r) == pytest.approx(target, rel=0.1)
    assert parameter_count(model, "lora", DECODER_TARGETS, r=16) == 24 * 16 * (2 * 1792 + 2 * 1024 + 3 * 5760)


def test_nola_regenerates_its_bases_and_matches_the_stored_form():
    """NoLA keeps no bases: A = Σ α_i A_i from regenerated bases, with the gradient of the stored form."""
    h = apply_adapter(tiny_encoder(), name="nola", r=2, num_basis_A=11, num_basis_B=9, target_modules=ENCODER_TARGETS)
    layer = next(iter(h.layers().values()))
    assert not any(b.numel() > 0 for b in layer.buffers())  # nothing stored besides the coefficients
    torch.manual_seed(0)
    with torch.no_grad():
        layer.nola_beta.normal_()
    basis_a, basis_b = layer.basis_A, layer.basis_B
    assert basis_a.shape == (11, 2, layer.in_features) and torch.equal(basis_a, layer.basis_A)  # same every time
    alpha = layer.nola_alpha.detach().clone().requires_grad_()
    beta = layer.nola_beta.detach().clone().requires_grad_()
    ref = layer.scaling * torch.einsum("k,kor->or", beta, basis_b) @ torch.einsum("k,kri->ri", alpha, basis_a)
    dw = layer.delta_weight()
    assert torch.allclose(dw, ref, atol=1e-6)
    g = torch.randn_like(ref)
    (dw * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.allclose(layer.nola_alpha.grad, alpha.grad, atol=1e-5)
    assert torch.allclose(layer.nola_beta.grad, beta.grad, atol=1e-5)
