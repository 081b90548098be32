"""The method library: math against exact references, layer invariants, save/load, errors, the core claim."""

import json

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from lrlora import (
    BASES,
    LRLoRAConfig,
    TransferFunction,
    adapter_parameter_count,
    apply_lrlora,
    load_adapter,
    lrlora_modules,
    merge_and_unload,
    rank_report,
    save_adapter,
    sigma,
    sigma_naive,
    stable_rank,
)
from lrlora.ops import _SigmaExact

DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_qwen2(seed=0, layers=4, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).to(dtype).eval()


def randomize_adapters(model, seed=1, scale=0.3):
    """Move every adapter away from its (identity) init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lrlora_modules(model).values():
            for p in (layer.lora_A, layer.lora_B, layer.transfer.a):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            layer.transfer.rho.add_(torch.randn(layer.transfer.rho.shape, generator=g) * 0.1)


def rel_err(x, y):
    x, y = x.detach(), y.detach()
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))


def random_transfer(basis, K=50, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    tf = TransferFunction(basis, K=K, L=3.0, amplitude_init="random", amplitude_init_std=0.5).to(dtype)
    with torch.no_grad():
        tf.rho.add_(torch.randn(K, dtype=dtype) * 0.3)
    return tf


def sigma_and_grads(t, tf, g, mode):
    t = t.detach().clone().requires_grad_()
    tf.zero_grad()
    y = sigma(t, tf, mode=mode)
    (y * g).sum().backward()
    return y.detach(), t.grad, tf.a.grad.clone(), tf.rho.grad.clone()


# ---------------------------------------------------------------- the σ op


@pytest.mark.parametrize("basis", BASES)
def test_fast_path_matches_exact_values_and_gradients(basis):
    tf = random_transfer(basis)
    torch.manual_seed(1)
    # Spread well beyond [−L, L] = [−3, 3] (the polynomial basis explodes outside, so keep it nearer).
    spread = 1.0 if basis == "polynomial" else 2.5
    t = torch.randn(96, 128) * spread
    assert t.abs().max() > 3.0
    g = torch.randn_like(t)
    fast = sigma_and_grads(t, tf, g, "table")
    exact = sigma_and_grads(t, tf, g, "exact")
    for name, f, e in zip(("value", "d/dt", "d/da", "d/drho"), fast, exact):
        assert rel_err(f, e) < 1e-5, f"{basis}: fast {name} off by {rel_err(f, e):.2e}"


def test_exact_path_agrees_with_naive_broadcast():
    tf = random_transfer("sinc", dtype=torch.float64)
    t = torch.randn(20, 30, dtype=torch.float64) * 2
    g = torch.randn_like(t)
    exact = sigma_and_grads(t, tf, g, "exact")
    tn = t.clone().requires_grad_()
    tf.zero_grad()
    (sigma_naive(tn, tf) * g).sum().backward()
    for e, n in zip(exact, (sigma_naive(t, tf).detach(), tn.grad, tf.a.grad, tf.rho.grad)):
        assert rel_err(e, n) < 1e-10


@pytest.mark.parametrize("basis", BASES)
def test_gradcheck_exact_path_float64(basis):
    tf = TransferFunction(basis, K=6, amplitude_init="random", amplitude_init_std=0.5, learn_grid=True).double()
    t = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, a, r, x: _SigmaExact.apply(t, tf.spec, a, r, x), (t, tf.a, tf.rho, tf.grid))


def test_auto_mode_uses_the_table_for_large_inputs_and_stays_accurate():
    tf = random_transfer("sinc")
    t = torch.randn(256, 512)
    assert rel_err(sigma(t, tf, mode="auto"), sigma(t, tf, mode="exact")) < 1e-5


def test_nonfinite_input_propagates_instead_of_breaking_the_table():
    tf = random_transfer("sinc")
    t = torch.randn(64, 64)
    t[3, 4] = float("nan")
    y = sigma(t, tf, mode="table")
    assert torch.isnan(y[3, 4]) and torch.isfinite(y[0, 0])


def test_a_range_too_wide_for_the_table_takes_the_exact_path():
    tf = random_transfer("sinc")
    t = torch.randn(64, 64)
    t[0, 0] = 2000.0  # would need ~8M table points
    assert torch.equal(sigma(t, tf, mode="table"), sigma(t, tf, mode="exact"))


def test_sigma_is_zero_at_zero_amplitude_and_linear_in_a():
    tf = TransferFunction("sinc")
    t = torch.randn(16, 16)
    assert torch.equal(sigma(t, tf), torch.zeros_like(t))
    with torch.no_grad():
        tf.a.fill_(1.0)
    y1 = sigma(t, tf, mode="exact")
    with torch.no_grad():
        tf.a.fill_(2.0)
    assert torch.allclose(sigma(t, tf, mode="exact"), 2 * y1, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_path_matches_exact_on_cuda():
    tf = random_transfer("sinc").cuda()
    t = (torch.randn(896, 4864) * 0.5).cuda()
    g = torch.randn_like(t)
    for f, e in zip(sigma_and_grads(t, tf, g, "table"), sigma_and_grads(t, tf, g, "exact")):
        assert rel_err(f, e) < 1e-5


# ---------------------------------------------------------------- the layer and the model


def test_identity_at_init():
    model = tiny_qwen2()
    ids = torch.randint(0, 97, (2, 12))
    before = model(ids).logits
    apply_lrlora(model, LRLoRAConfig(r=4, target_modules=DECODER_TARGETS))
    for layer in lrlora_modules(model).values():
        assert torch.equal(layer.delta_weight(), torch.zeros_like(layer.base_layer.weight))
    assert torch.equal(model(ids).logits, before)


def test_layer_exposes_the_base_weight_like_a_linear():
    model = apply_lrlora(tiny_qwen2(dtype=torch.bfloat16), LRLoRAConfig(r=2, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight is layer.base_layer.weight and layer.weight.dtype == torch.bfloat16
    assert layer.bias is layer.base_layer.bias


def test_only_adapters_are_trainable_and_modules_to_save_stay_trainable():
    model = tiny_qwen2()
    apply_lrlora(model, LRLoRAConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or ".transfer." in n or n.startswith("lm_head")) for n in trainable)
    assert any(n.startswith("lm_head") for n in trainable)
    assert not any(n.endswith("base_layer.weight") for n in trainable)


def test_first_step_moves_amplitudes_only_then_everything():
    """App. E.1: at a = 0 only a_k gets a gradient (σ' ≡ 0); after one step σ' ≠ 0 and B, A move too."""
    model = tiny_qwen2()
    apply_lrlora(model, LRLoRAConfig(r=4, target_modules=["q_proj"]))
    layer = next(iter(lrlora_modules(model).values()))
    ids = torch.randint(0, 97, (2, 12))
    model(ids, labels=ids).loss.backward()
    assert layer.transfer.a.grad.abs().sum() > 0
    assert layer.lora_B.grad.abs().sum() == 0 and layer.lora_A.grad.abs().sum() == 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    opt.zero_grad()
    model(ids, labels=ids).loss.backward()
    assert layer.lora_B.grad.abs().sum() > 0 and layer.lora_A.grad.abs().sum() > 0


def test_zero_B_init_keeps_sigma_even_and_B_frozen():
    """The finding behind init_B: with B = 0 (the paper's init read literally, docs/SOURCES.md) σ stays an even function,
    σ'(0) = 0, and B never receives a gradient however long it trains; ΔW stays rank one."""
    model = tiny_qwen2()
    apply_lrlora(model, LRLoRAConfig(r=4, target_modules=["q_proj"], init_B="zero"))
    layer = next(iter(lrlora_modules(model).values()))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 97, (4, 12))
    for _ in range(5):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    a = layer.transfer.a.detach()
    assert a.abs().max() > 0 and torch.allclose(a, a.flip(0), atol=1e-6)  # a_k = a_{-k}: σ even
    assert layer.lora_B.abs().max() < 1e-9
    assert stable_rank(layer.delta_weight()) == pytest.approx(1.0, abs=1e-3)


def test_merged_forward_equals_unmerged_and_unmerge_restores_w0():
    model = tiny_qwen2()
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    apply_lrlora(model, LRLoRAConfig(r=4, target_modules=DECODER_TARGETS))
    randomize_adapters(model)
    ids = torch.randint(0, 97, (2, 12))
    unmerged = model(ids).logits
    for layer in lrlora_modules(model).values():
        layer.merge()
    assert torch.allclose(model(ids).logits, unmerged, atol=1e-5, rtol=1e-4)
    for name, layer in lrlora_modules(model).items():
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, w0[name])  # bit for bit (lrlora.layer.fold)
        assert not torch.equal(layer.delta_weight(), torch.zeros_like(w0[name]))
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merge_and_unload_returns_a_plain_model():
    model = tiny_qwen2()
    apply_lrlora(model, LRLoRAConfig(r=4, target_modules=DECODER_TARGETS))
    randomize_adapters(model)
    ids = torch.randint(0, 97, (2, 12))
    adapted = model(ids).logits
    plain = merge_and_unload(model)
    assert not lrlora_modules(plain) and not hasattr(plain, "lrlora_config")
    assert not any("lora_" in n or "transfer" in n for n, _ in plain.named_parameters())
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.allclose(plain(ids).logits, adapted, atol=1e-5, rtol=1e-4)


def test_dropout_only_on_the_adapter_path_in_training():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48))
    model = apply_lrlora(base, LRLoRAConfig(r=4, target_modules=["0"], dropout=0.5))
    layer = model[0]
    x = torch.randn(8, 32)
    # With ΔW = 0 the output is the base output exactly, even in training: the base path is never dropped.
    model.train()
    assert torch.equal(model(x), layer.base_layer(x))
    randomize_adapters(model)
    y1, y2 = model(x), model(x)
    assert not torch.equal(y1, y2), "training with p > 0 must drop inputs of the adapter path"
    # What differs between calls lies in the adapter path: output − base(x) = dropout(x) ΔWᵀ, whose rows
    # for an all-dropped input are exactly zero.
    x0 = torch.zeros(1, 32)
    assert torch.allclose(model(x0), layer.base_layer(x0))
    model.eval()
    ye = model(x)
    assert torch.equal(ye, model(x))
    assert torch.allclose(ye, layer.base_layer(x) + x @ layer.delta_weight().T, atol=1e-5)


def test_half_precision_base_weights_keep_sigma_in_fp32():
    model = tiny_qwen2(dtype=torch.bfloat16)
    apply_lrlora(model, LRLoRAConfig(r=4, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(model)
    layer = next(iter(lrlora_modules(model).values()))
    assert layer.lora_A.dtype == torch.float32 and layer.delta_weight().dtype == torch.float32
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32


def test_center_removes_the_constant_offset():
    model = nn.Sequential(nn.Linear(16, 16))
    apply_lrlora(model, LRLoRAConfig(r=2, target_modules=["0"], center=True, init_B="zero", amplitude_init="random", amplitude_init_std=0.5))
    # B = 0 at init, so BA = 0 and σ(0) − σ(0) = 0 even though a ≠ 0.
    assert torch.count_nonzero(model[0].delta_weight()) == 0
    uncentered = apply_lrlora(nn.Sequential(nn.Linear(16, 16)), LRLoRAConfig(r=2, target_modules=["0"], init_B="zero", amplitude_init="random", amplitude_init_std=0.5))
    assert torch.count_nonzero(uncentered[0].delta_weight()) > 0


def test_pre_and_post_scale():
    torch.manual_seed(0)
    m1 = apply_lrlora(nn.Sequential(nn.Linear(16, 16)), LRLoRAConfig(r=2, target_modules=["0"]))
    randomize_adapters(m1)
    t = m1[0].lowrank_product()
    m1[0].pre_scale, m1[0].post_scale = 0.5, 3.0
    expected = 3.0 * m1[0].transfer.evaluate(0.5 * t)
    assert torch.allclose(m1[0].delta_weight(), expected, atol=1e-5)


def test_qwen2_0_5b_has_2k_transfer_parameters_per_module():
    """Table 7: 24 layers × 7 modules × 2K = 16,800 for Qwen2-0.5B (built on the meta device: no memory)."""
    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    r = 16
    apply_lrlora(model, LRLoRAConfig(r=r, target_modules=DECODER_TARGETS))
    layers = lrlora_modules(model)
    assert len(layers) == 24 * 7
    assert all(sum(p.numel() for p in m.transfer.parameters()) == 2 * 50 for m in layers.values())
    assert sum(p.numel() for m in layers.values() for p in m.transfer.parameters()) == 16_800
    lora = sum(r * (m.in_features + m.out_features) for m in layers.values())
    assert adapter_parameter_count(model) == lora + 16_800


@pytest.mark.parametrize(
    "share,share_by,expected_transfer",
    [("none", "model", 8 * 100), ("all", "model", 100), ("bandwidth", "model", 8 * 50 + 50),
     ("amplitude", "model", 8 * 50 + 50), ("all", "module_type", 2 * 100)],
)
def test_sharing_across_layers_ties_parameters(share, share_by, expected_transfer):
    model = tiny_qwen2()
    apply_lrlora(model, LRLoRAConfig(r=2, target_modules=["q_proj", "v_proj"], share=share, share_by=share_by))
    layers = list(lrlora_modules(model).values())
    unique = {id(p): p for m in layers for p in m.transfer.parameters()}
    assert sum(p.numel() for p in unique.values()) == expected_transfer
    lora = sum(2 * (m.in_features + m.out_features) for m in layers)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora + expected_transfer


def test_grid_sharing_needs_a_learnable_grid():
    with pytest.raises(ValueError, match="learn_grid"):
        LRLoRAConfig(share="grid")
    model = apply_lrlora(tiny_qwen2(), LRLoRAConfig(r=2, target_modules=["q_proj"], learn_grid=True, share="grid"))
    grids = {id(m.transfer.grid) for m in lrlora_modules(model).values()}
    assert len(grids) == 1


def test_fixed_bandwidth_is_not_trained():
    model = apply_lrlora(tiny_qwen2(), LRLoRAConfig(r=2, target_modules=["q_proj"], learn_bandwidth=False))
    assert all(not m.transfer.rho.requires_grad for m in lrlora_modules(model).values())
    assert all(torch.allclose(m.transfer.bandwidth, torch.ones(50)) for m in lrlora_modules(model).values())


@pytest.mark.parametrize(
    "spec,layers", [("odd", {1, 3}), ("even", {0, 2}), ("first:1", {0}), ("last:2", {2, 3}), ([0, 3], {0, 3}), (None, {0, 1, 2, 3})]
)
def test_placement_by_layer(spec, layers):
    model = apply_lrlora(tiny_qwen2(layers=4), LRLoRAConfig(r=2, target_modules=["q_proj", "down_proj"], layers_to_transform=spec))
    got = {int(n.split(".")[2]) for n in lrlora_modules(model)}
    assert got == layers


def test_placement_by_module_type():
    model = apply_lrlora(tiny_qwen2(), LRLoRAConfig(r=2, target_modules=r".*\.mlp\.(gate|up|down)_proj"))
    assert {n.rsplit(".", 1)[-1] for n in lrlora_modules(model)} == {"gate_proj", "up_proj", "down_proj"}


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_qwen2()
    apply_lrlora(model, LRLoRAConfig(r=4, target_modules=DECODER_TARGETS, share="bandwidth", modules_to_save=["lm_head"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    ids = torch.randint(0, 97, (2, 12))
    expected = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir() if not p.name.startswith(".")) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = load_adapter(tiny_qwen2(), tmp_path / "adapter")
    assert torch.equal(fresh(ids).logits, expected)
    # Tied parameters stay tied after loading.
    assert len({id(m.transfer.rho) for m in lrlora_modules(fresh).values()}) == 1


def test_save_is_atomic_a_crash_leaves_the_old_adapter(tmp_path, monkeypatch):
    model = apply_lrlora(tiny_qwen2(), LRLoRAConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "adapter")
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("lrlora.io.save_file", boom)
    randomize_adapters(model)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "no temporary folder may be left behind"


# ---------------------------------------------------------------- errors a user understands


def test_no_matching_module_lists_close_candidates():
    with pytest.raises(ValueError, match=r"no nn\.Linear matches target_modules=\['q_porj'\]\. Did you mean \[.*'q_proj'"):
        apply_lrlora(tiny_qwen2(), LRLoRAConfig(target_modules=["q_porj"]))


def test_rank_larger_than_the_layer():
    with pytest.raises(ValueError, match=r"r=65 exceeds min\(d_in, d_out\)=64"):
        apply_lrlora(tiny_qwen2(), LRLoRAConfig(r=65, target_modules=["q_proj"]))


def test_non_linear_target_is_refused():
    with pytest.raises(TypeError, match="not nn.Linear"):
        apply_lrlora(tiny_qwen2(), LRLoRAConfig(r=2, target_modules=["self_attn"]))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"K": 1}, "K must be >= 2"), ({"center": True, "init_B": "zero"}, "never trains"), ({"init_B": "normal"}, "init_B"), ({"basis": "wavelet"}, "unknown basis"), ({"share": "layers"}, "unknown sharing scope"),
     ({"layers_to_transform": "middle"}, "layers_to_transform"), ({"dropout": 1.5}, "dropout")],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRLoRAConfig(**kwargs)


def test_loading_onto_other_shapes_is_refused(tmp_path):
    model = apply_lrlora(tiny_qwen2(), LRLoRAConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    other = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=97))
    with pytest.raises(ValueError, match="other module shapes"):
        load_adapter(other, tmp_path / "a")


def test_corrupt_checkpoint_is_reported(tmp_path):
    model = apply_lrlora(tiny_qwen2(), LRLoRAConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_adapter(tiny_qwen2(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_adapter(tiny_qwen2(), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="save_adapter"):
        load_adapter(tiny_qwen2(), tmp_path / "missing")


def test_applying_twice_is_refused():
    model = apply_lrlora(tiny_qwen2(), LRLoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LR-LoRA"):
        apply_lrlora(model, LRLoRAConfig(r=2, target_modules=["v_proj"]))


def test_config_json_round_trip(tmp_path):
    cfg = LRLoRAConfig(r=3, target_modules=["a"], basis="bspline", share="all", layers_to_transform="last:2")
    assert LRLoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown LRLoRAConfig fields"):
        LRLoRAConfig.from_dict({"rank": 4})


# ---------------------------------------------------------------- rank tools and the core claim


def test_stable_rank_known_values():
    assert stable_rank(torch.eye(7)) == pytest.approx(7.0)
    assert stable_rank(torch.randn(9, 1) @ torch.randn(1, 5)) == pytest.approx(1.0, rel=1e-5)
    assert stable_rank(torch.diag(torch.tensor([2.0, 1.0]))) == pytest.approx(1.25)
    assert stable_rank(torch.zeros(4, 4)) == 0.0


def test_rank_report_rows():
    model = apply_lrlora(tiny_qwen2(), LRLoRAConfig(r=2, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(model)
    rows = rank_report(model, top=5)
    assert len(rows) == 8
    row = rows[0]
    assert row["module"] == "model.layers.0.self_attn.q_proj" and row["module_type"] == "q_proj" and row["layer"] == 0
    assert row["shape"] == [64, 64] and len(row["singular_values"]) == 5 and row["singular_values"][0] == pytest.approx(1.0)
    assert row["stable_rank_ba"] <= 2.0 + 1e-4  # BA has rank r = 2
    assert row["stable_rank_delta"] == pytest.approx(stable_rank(lrlora_modules(model)[row["module"]].delta_weight()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_core_claim_rank_one_sigma_beats_the_best_rank_one_product(seed):
    """Sec. 3.3: σ(BA) escapes rank r. Fit a high-rank target with r = 1: LR-LoRA must reach a stable
    rank above 1 and a lower error than the *optimal* rank-1 BA (the truncated SVD)."""
    torch.manual_seed(seed)
    d = 32
    target = torch.cos(2 * torch.randn(d, 1) @ torch.randn(1, d))
    target = target / target.norm() * d
    s = torch.linalg.svdvals(target)
    best_rank_one_err = float(s[1:].square().sum() / target.square().sum())
    model = apply_lrlora(nn.Sequential(nn.Linear(d, d, bias=False)), LRLoRAConfig(r=1, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():  # B = 0 would leave BA ≡ 0 for the first steps; start both factors generic
        layer.lora_A.copy_(torch.randn(1, d) * 0.5)
        layer.lora_B.copy_(torch.randn(d, 1) * 0.5)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(200):
        opt.zero_grad()
        loss = (layer.delta_weight() - target).square().sum() / target.square().sum()
        loss.backward()
        opt.step()
    dw = layer.delta_weight().detach()
    err = float((dw - target).square().sum() / target.square().sum())
    assert stable_rank(dw) > 1.2
    assert err < 0.5 * best_rank_one_err, f"σ(BA) error {err:.3f} vs best rank-1 BA {best_rank_one_err:.3f}"


def test_mechanism_diagnostics_known_values():
    """energy_beyond_r and linear_residual on matrices whose answers are known by construction."""
    from lrlora import mechanism

    torch.manual_seed(0)
    b, a = torch.randn(20, 2), torch.randn(2, 30)
    t = b @ a
    m = mechanism(t, 2)  # a rank-2 matrix has nothing beyond r = 2, and everything beyond r = 0
    assert m["energy_beyond_r"] == pytest.approx(0.0, abs=1e-12) and mechanism(t, 0)["energy_beyond_r"] == 1.0
    diag = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    assert mechanism(diag, 1)["energy_beyond_r"] == pytest.approx(5 / 14)
    affine = 0.7 * t - 0.3  # σ affine on its argument: no residual, though ΔW has rank 3
    m = mechanism(affine, 2, t)
    assert m["linear_residual"] == pytest.approx(0.0, abs=1e-6) and m["energy_beyond_r"] > 1e-4
    assert m["t_absmax"] == pytest.approx(float(t.abs().max())) and m["t_rms"] == pytest.approx(float(t.pow(2).mean().sqrt()))
    assert m["ba_stable_rank"] == pytest.approx(stable_rank(t))  # what ΔW's stable rank is held against
    bent = torch.sin(3 * t)  # far from affine on a wide range
    assert mechanism(bent, 2, t)["linear_residual"] > 0.5
    assert mechanism(torch.zeros(4, 5), 2, torch.zeros(4, 5)) == {"energy_beyond_r": 0.0, "t_absmax": 0.0,
                                                                 "t_rms": 0.0, "ba_stable_rank": 0.0,
                                                                 "linear_residual": 0.0}
    assert 1.0 < mechanism(diag, 1, diag)["ba_stable_rank"] == pytest.approx(14 / 9)


def test_rank_report_carries_the_mechanism():
    from lrlora import mechanism, sigma_argument

    model = apply_lrlora(tiny_qwen2(), LRLoRAConfig(r=2, target_modules=["q_proj"], pre_scale=3.0))
    randomize_adapters(model)
    row = rank_report(model)[0]
    layer = lrlora_modules(model)[row["module"]]
    assert torch.allclose(sigma_argument(layer), 3.0 * layer.lowrank_product())
    expected = mechanism(layer.delta_weight(), 2, sigma_argument(layer))
    assert {k: row[k] for k in expected} == pytest.approx(expected)


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 0.3, 3.0])
def test_fold_unfold_round_trip_is_exact(scale):
    """W0 + ΔW − ΔW rounds away from W0 on some entries (more as |ΔW| nears |W0|): fold records them, or W0 whole
    when they are most, and unfold gives W0 back bit for bit; without the record it is off on those entries."""
    from lrlora.layer import fold, unfold

    torch.manual_seed(0)
    w0 = torch.randn(96, 80) * 0.04
    dw = torch.randn_like(w0) * scale
    for fix in ("record", None):
        w = w0.clone()
        record = fold(w, dw.clone())
        assert torch.equal(w, w0 + dw)
        unfold(w, dw, record if fix else None)
        if fix:
            assert torch.equal(w, w0)
        elif scale >= 1e-2:
            assert not torch.equal(w, w0)  # the record is needed (test self-check)


def test_merged_context_evaluates_with_folded_weights_and_restores_them():
    """Inside lrlora.model.merged every LR-LoRA layer runs its base layer with W0 + ΔW (ΔW computed once, not per
    forward): the outputs are the adapter's, and on exit every weight of the model is back bit for bit. A change
    of the adapter while merged is noticed: unmerge then subtracts the new ΔW (no stale record)."""
    from lrlora import fused
    from lrlora.model import merged

    model = tiny_qwen2()
    apply_lrlora(model, LRLoRAConfig(r=4, target_modules=DECODER_TARGETS))
    randomize_adapters(model)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 97, (2, 12))
    calls = []
    orig = fused.LRLoRALinearFunction.apply
    with torch.no_grad():
        unmerged = model(ids).logits
        fused.LRLoRALinearFunction.apply = lambda *a: calls.append(1) or orig(*a)
        try:
            with merged(model):
                assert all(m.merged for m in lrlora_modules(model).values())
                inside = model(ids).logits
        finally:
            fused.LRLoRALinearFunction.apply = orig
    assert calls == []  # no σ per forward while merged
    torch.testing.assert_close(inside, unmerged, rtol=1e-5, atol=1e-6)
    assert not any(m.merged for m in lrlora_modules(model).values())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    layer = next(iter(lrlora_modules(model).values()))
    with torch.no_grad():
        w0, dw_old = layer.base_layer.weight.clone(), layer.delta_weight()
        layer.merge()
        layer.lora_A.mul_(2.0)
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, (w0 + dw_old) - layer.delta_weight())
