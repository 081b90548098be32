"""The fused LR-LoRA linear (lrlora.fused) against the plain-autograd reference layer: values, every
gradient, gradcheck in float64, and what it keeps for backward."""

import pytest
import torch
from torch import nn

from lrlora import BASES, LRLoRALinear, TransferFunction
from lrlora.ops import make_table, use_table


def make_layer(d_in, d_out, basis="sinc", dtype=torch.float32, seed=0, bias=True, learn_grid=False, scale=0.4, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    base.weight.requires_grad_(False)
    if bias:
        base.bias.requires_grad_(False)
    tf = TransferFunction(basis, K=12, L=3.0, amplitude_init="random", amplitude_init_std=0.5, learn_grid=learn_grid)
    layer = LRLoRALinear(base, r=4, transfer=tf, **kw)
    with torch.no_grad():
        layer.lora_A.normal_(0, scale)
        layer.lora_B.normal_(0, scale)
        tf.rho.add_(torch.randn_like(tf.rho) * 0.2)
    return layer


def run(layer, x, mask, p, fused):
    """Output and gradients of every input (x, A, B, a, rho, grid when learnable) for a fixed upstream g."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    if fused:
        y = layer.forward_fused(x, mask, p)
    elif mask is None:
        y = layer.forward_reference(x)
    else:  # the reference's two-path form with this very mask
        base = layer.base_layer
        y = base(x) + nn.functional.linear(x * mask * (1.0 / (1.0 - p)), layer.delta_weight().to(x.dtype))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(device=y.device, dtype=y.dtype)
    (y.float() * g.float()).sum().backward()
    tf = layer.transfer
    grads = {"x": x.grad, "A": layer.lora_A.grad, "B": layer.lora_B.grad, "a": tf.a.grad, "rho": tf.rho.grad}
    if isinstance(tf.grid, nn.Parameter):
        grads["grid"] = tf.grid.grad
    return y.detach(), grads


def rel_err(x, y):
    x, y = x.detach().double(), y.detach().double()
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))


def check_agree(layer, x, mask=None, p=0.0, tol=1e-5):
    y_f, g_f = run(layer, x, mask, p, fused=True)
    y_r, g_r = run(layer, x, mask, p, fused=False)
    assert y_f.dtype == y_r.dtype
    assert rel_err(y_f, y_r) < tol, f"output off by {rel_err(y_f, y_r):.2e}"
    for k in g_r:
        assert g_f[k] is not None and g_f[k].dtype == g_r[k].dtype, k
        assert rel_err(g_f[k], g_r[k]) < tol, f"d/d{k} off by {rel_err(g_f[k], g_r[k]):.2e}"


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_matches_reference_table_path(basis, dropout):
    # 192 × 256 = 49k elements: "auto" takes the table path (more than 4 × its points).
    layer = make_layer(256, 192, basis, learn_grid=True, scale=0.12 if basis == "polynomial" else 0.25)
    x = torch.randn(3, 5, 256)
    t = layer.lowrank_product()
    tf = layer.transfer
    assert use_table(t, make_table(t, tf.spec, tf.a, tf.rho, tf.grid, 1024), "auto")
    mask = (torch.rand(x.shape) > dropout) if dropout else None
    check_agree(layer, x, mask, dropout)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("opts", [dict(), dict(center=True), dict(pre_scale=0.7, post_scale=1.9), dict(fast=False)])
def test_fused_matches_reference_small_and_options(dropout, opts):
    # 24 × 16: "auto" takes the exact path, so the backward recomputes ΔW under autograd.
    for shape in ((16, 24), (160, 96)):
        layer = make_layer(*shape, **opts)
        x = torch.randn(7, shape[0])
        mask = (torch.rand(x.shape) > dropout) if dropout else None
        check_agree(layer, x, mask, dropout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_half_precision_base_keeps_sigma_in_fp32(dtype, dropout):
    layer = make_layer(256, 192, dtype=dtype, scale=0.25)
    x = torch.randn(4, 256).to(dtype)
    mask = (torch.rand(x.shape) > dropout) if dropout else None
    y, grads = run(layer, x, mask, dropout, fused=True)
    assert y.dtype == dtype and grads["x"].dtype == dtype
    assert all(grads[k].dtype == torch.float32 for k in ("A", "B", "a", "rho"))
    # Same arithmetic as the reference (ΔW cast to the base dtype for the matmul): agree to half rounding.
    check_agree(layer, x, mask, dropout, tol=1e-2)


def test_unfrozen_base_and_bias_get_the_plain_linear_gradients():
    layer = make_layer(160, 96)
    layer.base_layer.weight.requires_grad_(True)
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(5, 160)
    out = {}
    for fused in (True, False):
        layer.zero_grad(set_to_none=True)
        y = layer.forward_fused(x) if fused else layer.forward_reference(x)
        y.square().sum().backward()
        out[fused] = (layer.base_layer.weight.grad.clone(), layer.base_layer.bias.grad.clone())
    for f, r in zip(out[True], out[False]):
        assert rel_err(f, r) < 1e-5


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_gradcheck_fused_float64(basis, dropout):
    from lrlora.fused import LRLoRALinearFunction

    layer = make_layer(6, 5, basis, learn_grid=True, center=True, pre_scale=0.8, post_scale=1.3, fast=False).double()
    tf, base = layer.transfer, layer.base_layer
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(x.shape) > dropout) if dropout else None
    ds = layer.delta_spec()
    w = base.weight.detach().requires_grad_()
    b = base.bias.detach().requires_grad_()

    def f(x, w, b, A, B, a, rho, grid):
        return LRLoRALinearFunction.apply(x, w, b, A, B, a, rho, grid, ds, mask, 1.0 / (1.0 - dropout))

    assert torch.autograd.gradcheck(f, (x, w, b, layer.lora_A, layer.lora_B, tf.a, tf.rho, tf.grid))


def test_fused_saves_no_dense_matrix_but_the_weight():
    """What autograd keeps between forward and backward: the reference keeps BA and W0 + ΔW (two
    d_out × d_in matrices per layer); the fused function keeps x, the mask and references to parameters."""
    layer = make_layer(160, 96)
    weight_ptr = layer.base_layer.weight.data_ptr()
    param_ptrs = {p.data_ptr() for p in layer.parameters()} | {b.data_ptr() for b in layer.buffers()}

    def dense_saved(fused, mask):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        x = torch.randn(4, 160, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer.forward_fused(x, mask, 0.3 if mask is not None else 0.0) if fused else layer.forward_reference(x)
        y.sum().backward()
        return [t for t in saved if t.numel() >= 96 * 160 and t.data_ptr() not in param_ptrs]

    assert len(dense_saved(False, None)) >= 2, "the reference should keep BA and W0 + ΔW (test self-check)"
    assert dense_saved(True, None) == []
    assert dense_saved(True, torch.rand(4, 160) > 0.3) == []
    assert weight_ptr in param_ptrs


def test_layer_uses_the_fused_function_and_can_fall_back():
    layer = make_layer(160, 96)
    x = torch.randn(2, 160, requires_grad=True)
    assert "LRLoRALinearFunction" in type(layer(x).grad_fn).__name__
    layer.fused = False
    assert "LRLoRALinearFunction" not in type(layer(x).grad_fn).__name__


def test_dropout_mask_is_drawn_in_training_only():
    layer = make_layer(160, 96, dropout=0.5)
    x = torch.randn(16, 160)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert torch.allclose(layer(x), layer.forward_reference(x), atol=1e-5)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("spread", [0.05, 0.8, 3.0])
def test_table_matches_exact_on_small_and_large_tables(spread, compiled, monkeypatch):
    """Small tables (≤ 2^14 points) take float positions in the compiled kernel, large ones float64:
    both stay within 1e-5 of the exact σ op for values and every gradient (sinc, learnable grid); so does
    the pure-PyTorch path taken without a compiler."""
    import lrlora._kernels
    from lrlora import sigma

    if compiled and lrlora._kernels.get() is None:
        pytest.skip("no compiler: the compiled kernels are unavailable here")
    if not compiled:
        monkeypatch.setattr(lrlora._kernels, "get", lambda: None)
    torch.manual_seed(3)
    tf = TransferFunction("sinc", K=50, amplitude_init="random", amplitude_init_std=0.5, learn_grid=True)
    t = torch.randn(256, 384) * spread
    m = make_table(t, tf.spec, tf.a, tf.rho, tf.grid, 1024).m
    assert (m <= 1 << 14) == (spread < 1.0)
    g = torch.randn_like(t)
    out = {}
    for mode in ("table", "exact"):
        tt = t.clone().requires_grad_()
        tf.zero_grad(set_to_none=True)
        y = sigma(tt, tf, mode=mode)
        (y * g).sum().backward()
        out[mode] = (y.detach(), tt.grad, tf.a.grad, tf.rho.grad, tf.grid.grad)
    for name, f, e in zip(("value", "t", "a", "rho", "grid"), out["table"], out["exact"]):
        assert rel_err(f, e) < 1e-5, f"{name}: {rel_err(f, e):.2e}"


def test_cuda_form_reads_nothing_on_the_host_and_matches_exact(monkeypatch):
    """The CUDA form of the table (range and step as device tensors, fixed size, index_add_ histogram) run
    on CPU: no tensor is read on the host (.item/float/bool/tolist would sync a GPU per layer), and the fused
    layer still matches the reference's exact path."""
    import lrlora.ops as ops

    monkeypatch.setattr(ops, "DEVICE_SIDE_TABLE_ON_CPU", True)
    layer = make_layer(256, 192, scale=0.25)
    x = torch.randn(3, 256)
    reads = []
    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    y_f, g_f = run(layer, x, None, 0.0, fused=True)
    monkeypatch.undo()
    assert reads == [], f"host reads in the CUDA form: {reads}"
    layer.fast = False  # the reference through the exact σ op
    y_r, g_r = run(layer, x, None, 0.0, fused=False)
    assert rel_err(y_f, y_r) < 1e-5
    for k in g_r:
        assert rel_err(g_f[k], g_r[k]) < 1e-5, k


def test_compiled_kernels_build_where_a_compiler_exists():
    """Where g++ and ninja exist the fast path must not fall back silently to the slower PyTorch form."""
    import shutil

    import lrlora._kernels

    if not (shutil.which("g++") and shutil.which("ninja")):
        pytest.skip("no g++/ninja")
    assert lrlora._kernels.get() is not None


def test_fused_layer_without_the_compiled_kernels(monkeypatch):
    import lrlora._kernels

    monkeypatch.setattr(lrlora._kernels, "get", lambda: None)
    layer = make_layer(256, 192, scale=0.25, center=True)
    x = torch.randn(3, 256)
    check_agree(layer, x, None, 0.0)
    check_agree(layer, x, torch.rand(x.shape) > 0.3, 0.3)


# The sparse-correction dropout form (p ≤ lrlora.fused._SPARSE_DROPOUT_MAX, fp32/fp64 on CPU): one merged
# matmul plus products over the dropped entries only, held to the reference's two-path form.


def _keep_mask(pos, shape):
    keep = torch.ones(int(torch.Size(shape).numel()), dtype=torch.bool)
    keep[pos] = False
    return keep.view(shape)


@pytest.mark.parametrize("basis", ["sinc", "bspline"])
@pytest.mark.parametrize("p", [0.05, 0.15])
@pytest.mark.parametrize("opts", [dict(), dict(center=True, pre_scale=0.7, post_scale=1.9)])
def test_sparse_dropout_form_matches_the_two_path_reference(basis, p, opts):
    import lrlora.fused as fused

    assert p <= fused._SPARSE_DROPOUT_MAX
    # 256 × 192 takes the table path in backward, 24 × 16 the exact one (autograd recomputation).
    for d_in, d_out in ((256, 192), (24, 16)):
        layer = make_layer(d_in, d_out, basis, learn_grid=True, scale=0.2, **opts)
        x = torch.randn(5, 3, d_in).transpose(0, 1)  # 3-D and not contiguous
        assert fused._sparse_dropout(x, layer.base_layer.weight, 1.0 / (1.0 - p))
        pos = fused.draw_dropout(x, layer.base_layer.weight, p)
        assert pos.dtype == torch.int64 and pos.numel() > 0
        # The function takes the positions (the layer's own draw) or the equivalent bool mask alike.
        y_r, g_r = run(layer, x, _keep_mask(pos, x.shape), p, fused=False)
        for form in (pos, _keep_mask(pos, x.shape)):
            y_f, g_f = run(layer, x, form, p, fused=True)
            assert rel_err(y_f, y_r) < 1e-5
            for k in g_r:
                assert rel_err(g_f[k], g_r[k]) < 1e-5, f"d/d{k} off by {rel_err(g_f[k], g_r[k]):.2e}"


@pytest.mark.parametrize("pos", [[], [0, 7, 1023]])
def test_sparse_dropout_form_with_no_or_few_dropped_entries(pos):
    layer = make_layer(256, 192, bias=False)
    x = torch.randn(4, 256)
    pos = torch.tensor(pos, dtype=torch.long)
    y_r, g_r = run(layer, x, _keep_mask(pos, x.shape), 0.05, fused=False)
    y_f, g_f = run(layer, x, pos, 0.05, fused=True)
    assert rel_err(y_f, y_r) < 1e-5
    assert all(rel_err(g_f[k], g_r[k]) < 1e-5 for k in g_r)


def test_gradcheck_sparse_dropout_form_float64():
    from lrlora.fused import LRLoRALinearFunction, _sparse_dropout

    layer = make_layer(6, 5, "sinc", learn_grid=True, center=True, fast=False).double()
    tf, base = layer.transfer, layer.base_layer
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([1, 8, 9, 17])
    assert _sparse_dropout(x, base.weight, 1.0 / 0.9)
    w = base.weight.detach().requires_grad_()
    b = base.bias.detach().requires_grad_()

    def f(x, w, b, A, B, a, rho, grid):
        return LRLoRALinearFunction.apply(x, w, b, A, B, a, rho, grid, layer.delta_spec(), pos, 1.0 / 0.9)

    assert torch.autograd.gradcheck(f, (x, w, b, layer.lora_A, layer.lora_B, tf.a, tf.rho, tf.grid))


def test_draw_dropout_picks_the_form_and_follows_bernoulli():
    """Positions where the sparse form serves, a bool mask elsewhere; the positions are ascending, distinct,
    in range, and follow the law of independent Bernoulli(p) drops (count and per-entry rate)."""
    from lrlora.fused import draw_dropout

    w = torch.zeros(3, 20)
    assert draw_dropout(torch.zeros(4, 20), w, 0.3).dtype == torch.bool  # above the sparse limit
    assert draw_dropout(torch.zeros(4, 20, dtype=torch.bfloat16), w.bfloat16(), 0.1).dtype == torch.bool
    torch.manual_seed(0)
    x, p, trials = torch.zeros(20), 0.15, 20000
    hits, counts = torch.zeros(20), []
    for _ in range(trials):
        pos = draw_dropout(x, w, p)
        assert pos.dtype == torch.int64
        assert bool((pos[1:] > pos[:-1]).all()) and (pos.numel() == 0 or (0 <= int(pos[0]) and int(pos[-1]) < 20))
        hits[pos] += 1
        counts.append(pos.numel())
    counts = torch.tensor(counts, dtype=torch.float64)
    # Binomial(20, 0.15): mean 3, variance 2.55; every entry dropped at rate 0.15 (first and last included:
    # an off-by-one in the gaps shows there first).
    assert abs(float(counts.mean()) - 3.0) < 5 * (2.55 / trials) ** 0.5
    assert abs(float(counts.var()) - 2.55) < 0.15
    rate_sd = (p * (1 - p) / trials) ** 0.5
    assert float((hits / trials - p).abs().max()) < 5 * rate_sd
    big = draw_dropout(torch.zeros(512, 896), w, 0.05)
    assert abs(big.numel() - 0.05 * 512 * 896) < 6 * (512 * 896 * 0.05 * 0.95) ** 0.5


def test_layer_training_forward_takes_the_sparse_form_and_saves_less_than_a_mask():
    layer = make_layer(256, 192, dropout=0.05)
    layer.train()
    saved = []
    x = torch.randn(64, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    drop = [t for t in saved if t.dtype in (torch.bool, torch.int64)]
    assert len(drop) == 1 and drop[0].dtype == torch.int64 and drop[0].dim() == 1
    assert drop[0].numel() * 8 < x.numel()  # fewer bytes than the bool mask it replaces


def test_fp32_adapter_on_an_fp64_base_takes_the_two_path_form():
    layer = make_layer(256, 192)
    layer.base_layer.double()  # the adapter stays fp32
    x = torch.randn(4, 256, dtype=torch.float64)
    pos = torch.tensor([3, 300, 777])
    y_r, g_r = run(layer, x, _keep_mask(pos, x.shape), 0.05, fused=False)
    y_f, g_f = run(layer, x, pos, 0.05, fused=True)
    assert y_f.dtype == torch.float64 and rel_err(y_f, y_r) < 1e-5
    assert all(rel_err(g_f[k], g_r[k]) < 1e-5 for k in g_r)


def test_compiled_form_in_float64_with_threads_and_a_shared_workspace():
    """The compiled CPU form (lrlora._kernels: table passes into the workspace, the merged weight in one pass,
    the dropped entries' products) in float64 and with two threads (its kernels split rows and entries), for layers
    of different shapes one after another (one workspace): every output and gradient agrees with the reference, and
    no output or gradient shares memory with the workspace."""
    import lrlora._kernels
    from lrlora import fused

    if lrlora._kernels.get() is None:
        pytest.skip("no compiler: the compiled kernels are unavailable here")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (torch.float32, torch.float64):
            for d_in, d_out, p in ((256, 192, 0.1), (192, 320, 0.0), (256, 192, 0.05)):
                layer = make_layer(d_in, d_out, dtype=dtype, scale=0.25, center=True, post_scale=1.3).to(dtype)
                x = torch.randn(6, 7, d_in, dtype=dtype)
                assert fused._compiled(x, layer.base_layer.weight, layer.lora_A) is not None
                pos = fused.draw_dropout(x, layer.base_layer.weight, p) if p else None
                y_f, g_f = run(layer, x, pos, p, fused=True)
                y_r, g_r = run(layer, x, _keep_mask(pos, x.shape) if p else None, p, fused=False)
                tol = 1e-5 if dtype == torch.float32 else 1e-10
                assert rel_err(y_f, y_r) < tol
                for k in g_r:
                    assert rel_err(g_f[k], g_r[k]) < tol, f"d/d{k}: {rel_err(g_f[k], g_r[k]):.2e}"
                spaces = [b.untyped_storage().data_ptr() for b in fused._WORKSPACE.buffers.values()]
                assert spaces and all(t.untyped_storage().data_ptr() not in spaces for t in (y_f, *g_f.values()))
    finally:
        torch.set_num_threads(threads)
    fused.release_workspace()
    assert not fused._WORKSPACE.buffers


def test_forward_table_serves_the_backward():
    """The backward takes the forward's table (t = BA recomputed bit for bit): no second range or table."""
    from lrlora import ops

    layer = make_layer(256, 192, scale=0.25)
    x = torch.randn(4, 256)
    built = []
    orig = ops.make_table
    import lrlora.fused as fused

    fused.make_table = lambda *a, **k: built.append(1) or orig(*a, **k)
    try:
        layer.forward_fused(x.requires_grad_()).sum().backward()
    finally:
        fused.make_table = orig
    assert built == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_fused_layer_on_cuda_matches_the_reference(dtype, dropout):
    """On CUDA: the table's device form (no host reads) and the two-path dropout form, fp32 and bf16 bases."""
    layer = make_layer(256, 192, dtype=dtype, scale=0.25, center=True).cuda()
    x = torch.randn(4, 9, 256, device="cuda").to(dtype)
    mask = (torch.rand(x.shape, device="cuda") > dropout) if dropout else None
    check_agree(layer, x, mask, dropout, tol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merged_evaluation_on_cuda_gives_the_weights_back():
    from lrlora.model import merged

    layer = make_layer(256, 192, scale=0.25).cuda().eval()
    w0 = layer.base_layer.weight.clone()
    x = torch.randn(3, 256, device="cuda")
    with torch.no_grad():
        y = layer(x)
        with merged(layer):
            y_merged = layer(x)
    assert rel_err(y_merged, y) < 1e-5 and torch.equal(layer.base_layer.weight, w0)
