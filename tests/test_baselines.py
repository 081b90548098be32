"""The generic table: every adapter method × {tiny decoder, tiny encoder} × the interface's invariants.

    .venv/bin/python -m pytest -q tests/test_baselines.py

A new method joins by adding one row to METHODS (its kwargs for the tiny models); the last tests add a toy
method in exactly the three places CONTRIBUTING.md names (its code, its YAML, its row) and run it through all.
"""

import copy
import inspect
import shutil
import sys
import textwrap

import pytest
import torch

import baselines
from baselines import ADAPTERS, apply_adapter, load_adapted, match_budget, parameter_count
from baselines.budget import budget_percent
from baselines.peft_methods import PeftAdapted
from tests.tiny_models import DECODER_TARGETS, ENCODER_TARGETS, tiny_decoder, tiny_encoder

# method -> kwargs on the tiny models (besides target_modules / modules_to_save) and the Adam lr of the
# five-step test (VeRA/RandLoRA/NoLA train few scalars and take a larger lr, as in their papers).
METHODS = {
    "lora": (dict(r=4), 1e-2),
    "dora": (dict(r=4), 1e-2),
    "vera": (dict(r=16), 5e-2),
    "randlora": (dict(r=8), 5e-2),
    "adalora": (dict(r=6, target_r=4), 1e-2),
    "sinelora": (dict(r=4, omega=20.0), 1e-2),
    "dylora": (dict(r=4), 1e-2),
    "elalora": (dict(r=4, r_max=6, deltaT=1, b_init=1), 1e-2),
    "nola": (dict(r=4, num_basis_A=32, num_basis_B=32), 5e-2),
    "lrlora": (dict(r=4, K=10), 1e-3),  # Adam moves all a_k at once: σ(0) shifts ~lr·Σ_k|φ_k(0)| a step
}
STEPS = 5


def _setup(kind):
    torch.manual_seed(1)
    if kind == "decoder":
        ids = torch.randint(0, 128, (4, 12))
        return tiny_decoder, DECODER_TARGETS, None, dict(input_ids=ids, labels=ids)
    ids = torch.randint(0, 128, (4, 12))
    return tiny_encoder, ENCODER_TARGETS, ["classifier"], dict(input_ids=ids, labels=torch.tensor([0, 1, 2, 1]))


def _loss(model, batch):
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


class Case:
    """One method on one tiny model: built, its init state recorded, then trained STEPS steps."""

    def __init__(self, method, kind):
        kwargs, lr = METHODS[method]
        build, targets, heads, batch = _setup(kind)
        self.method, self.kind, self.build, self.batch = method, kind, build, batch
        self.kwargs = dict(kwargs, target_modules=targets, modules_to_save=heads)
        model = build()
        self.backbone_params = dict(model.named_parameters())  # the same tensors stay inside the adapted model
        self.handle = apply_adapter(model, name=method, **self.kwargs)
        self.dw_init = self.handle.delta_weights()
        self.loss_init = _loss(self.handle.model, batch)
        self.out_init = self.handle.model(**batch).logits
        params = [p for p in self.handle.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.handle.model.train()
        for step in range(1, STEPS + 1):
            self.handle.model(**batch).loss.backward()
            opt.step()
            self.handle.on_step(step, STEPS)  # after step, before zero_grad: AdaLoRA/ElaLoRA read the grads
            opt.zero_grad()
        self.loss_final = _loss(self.handle.model, batch)


_CASES = {}


@pytest.fixture(params=[(m, k) for m in METHODS for k in ("decoder", "encoder")], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    torch.set_num_threads(1)
    if request.param not in _CASES:
        _CASES[request.param] = Case(*request.param)
    return _CASES[request.param]


def test_every_registered_method_has_a_row():
    assert set(ADAPTERS) == set(METHODS)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="lora"):
        apply_adapter(tiny_encoder(), name="no-such-method", r=4, target_modules=ENCODER_TARGETS)


def test_outputs_finite(case):
    assert torch.isfinite(case.out_init).all()
    assert all(torch.isfinite(d).all() for d in case.handle.delta_weights().values())


def test_only_adapter_parameters_train(case):
    heads = case.kwargs["modules_to_save"] or []
    for name, p in case.backbone_params.items():
        is_head = any(name.startswith(h + ".") for h in heads)
        # PEFT methods (LR-LoRA among them) train a copy of the head (ModulesToSaveWrapper), the others the head itself
        assert p.requires_grad == (is_head and not isinstance(case.handle, PeftAdapted)), name
    trainable = sum(p.numel() for p in case.handle.model.parameters() if p.requires_grad)
    head = sum(p.numel() for n, p in case.backbone_params.items() if any(n.startswith(h + ".") for h in heads))
    assert trainable == case.handle.trainable_parameters() + head


def test_backbone_unchanged_by_training(case):
    fresh = dict(case.build().named_parameters())
    heads = case.kwargs["modules_to_save"] or []
    for name, p in case.backbone_params.items():
        if not any(name.startswith(h + ".") for h in heads):
            assert torch.equal(p, fresh[name]), name


def test_parameter_count_matches_formula(case):
    kw = {k: v for k, v in case.kwargs.items() if k not in ("target_modules", "modules_to_save")}
    expected = parameter_count(case.build(), case.method, case.kwargs["target_modules"], **kw)
    assert case.handle.trainable_parameters() == expected
    assert case.handle.total_parameters() == sum(p.numel() for p in case.build().parameters())


def test_delta_w_zero_at_init_and_moves(case):
    n_linear = sum(1 for n, m in case.build().named_modules()
                   if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in case.kwargs["target_modules"])
    assert len(case.dw_init) == n_linear
    for name, dw in case.dw_init.items():
        assert dw.dtype == torch.float32 and not dw.requires_grad
        assert torch.count_nonzero(dw) == 0, name
    moved = [torch.count_nonzero(dw) > 0 for dw in case.handle.delta_weights().values()]
    assert any(moved)


def test_five_steps_lower_the_loss(case):
    assert case.loss_final < case.loss_init


def test_save_load_round_trip_exact(case, tmp_path):
    case.handle.save(tmp_path / "adapter")
    case.handle.save(tmp_path / "adapter")  # overwriting an existing adapter dir is atomic too
    loaded = load_adapted(case.build(), tmp_path / "adapter")
    assert loaded.name == case.method
    if case.method != "adalora":  # PEFT reloads AdaLoRA resized to its final rank_pattern (PEFT #1801)
        assert loaded.trainable_parameters() == case.handle.trainable_parameters()
    case.handle.model.eval()
    loaded.model.eval()
    with torch.no_grad():
        out_loaded, out = loaded.model(**case.batch).logits, case.handle.model(**case.batch).logits
    if case.method == "adalora":  # the masked components are gone: same ΔW, matmuls of another inner size
        torch.testing.assert_close(out_loaded, out, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(out_loaded, out)
    dw_a, dw_b = case.handle.delta_weights(), loaded.delta_weights()
    assert dw_a.keys() == dw_b.keys()
    assert all(torch.equal(dw_a[k], dw_b[k]) for k in dw_a)


def test_merged_forward_equals_unmerged(case):
    handle = copy.deepcopy(case.handle)
    handle.model.eval()
    dws = handle.delta_weights()
    with torch.no_grad():
        before = handle.model(**case.batch).logits
        merged = handle.merge_and_unload()
        after = merged(**case.batch).logits
    assert not any("lora" in n or "vera" in n or "nola" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    fresh = case.build()  # delta_weights() is exactly what merging adds to W0 (DoRA's magnitude included)
    for name, dw in dws.items():
        w = merged.get_submodule(name).weight - fresh.get_submodule(name).weight
        torch.testing.assert_close(w, dw, rtol=1e-4, atol=1e-6)


def test_adaptive_methods_report_ranks(case):
    extra = case.handle.extra_results()
    if case.method in ("adalora", "elalora"):
        assert set(extra["ranks"]) == set(case.dw_init)
        assert all(isinstance(v, int) and v >= 0 for v in extra["ranks"].values())
    else:
        assert isinstance(extra, dict)


# --- matched budgets -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_match_budget_hits_the_closest_achievable_percent(method):
    model = tiny_decoder()
    target = 5.0
    kw = match_budget(model, method, target, DECODER_TARGETS, max_value=64, **({"r": 4} if method == "nola" else {}))
    extra = {"r": 4} if method == "nola" else {}
    pct = budget_percent(model, method, DECODER_TARGETS, **extra, **kw)
    (knob, value), = list(kw.items())[:1]
    for other in (value - 1, value + 1):
        if 1 <= other <= 64:
            alt = dict(kw, **{k: other for k in kw})
            assert abs(budget_percent(model, method, DECODER_TARGETS, **extra, **alt) - target) >= abs(pct - target)
    handle = apply_adapter(model, name=method, target_modules=DECODER_TARGETS, **extra, **kw)
    assert handle.trainable_percent() == pytest.approx(pct)


def test_randlora_budget_pairs_fewer_params_with_larger_r():
    model = tiny_decoder()
    lora = parameter_count(model, "lora", DECODER_TARGETS, r=4)
    assert parameter_count(model, "randlora", DECODER_TARGETS, r=32) < parameter_count(model, "randlora", DECODER_TARGETS, r=8)
    r = match_budget(model, "randlora", budget_percent(model, "lora", DECODER_TARGETS, r=4), DECODER_TARGETS)["r"]
    assert abs(parameter_count(model, "randlora", DECODER_TARGETS, r=r) - lora) / lora < 0.35


# --- the YAMLs ---------------------------------------------------------------------------------------
CONF = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf" / "adapter"
HARNESS_KEYS = ("name", "lr")  # read by experiments/train.py, not passed to apply_adapter


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_has_a_yaml_that_builds(method):
    cfg, loss, trainable = _build_from_yaml(CONF, method)
    assert cfg["name"] == method and "r" in cfg  # run_name uses adapter.r
    assert torch.isfinite(loss) and trainable > 0


def _build_from_yaml(conf, method):
    """The method's YAML as the harness reads it, applied to a tiny encoder, one training step taken: (the YAML,
    the step's loss, the trainable parameter count)."""
    import yaml

    cfg = yaml.safe_load((conf / f"{method}.yaml").read_text())
    kw = {k: v for k, v in cfg.items() if k not in HARNESS_KEYS}
    kw.update(target_modules=ENCODER_TARGETS, dropout=0.1, modules_to_save=["classifier"])  # what the harness fills
    handle = apply_adapter(tiny_encoder(), name=method, **kw)
    handle.model.train()
    out = handle.model(input_ids=torch.randint(0, 128, (2, 8)), labels=torch.tensor([0, 1]))
    out.loss.backward()
    handle.on_step(1, 100)
    return cfg, out.loss.detach(), handle.trainable_parameters()


# --- adding a method: its code, its YAML, its row; nothing else ----------------------------------------------
TOY_CODE = '''
"""Toy: ΔW = (α/r)·B A with B = 0 at init, a method written only for the test that adds one."""
from baselines.core import register
from baselines.layers import LowRankLinear, SelfWrittenAdapted


class ToyLinear(LowRankLinear):
    def delta_weight(self):
        return self.scaling * (self.lora_B @ self.lora_A)


@register("toy")
class Toy(SelfWrittenAdapted):
    label = "Toy"

    @classmethod
    def parameters_per_module(cls, d_in, d_out, r=8, **_):
        return r * (d_in + d_out)

    def make_layer(self, name, linear, r=8, lora_alpha=None, dropout=0.0):
        return ToyLinear(linear, r, lora_alpha, dropout)
'''
TOY_YAML = """\
# Toy (the test that adds a method): ΔW = (α/r)·B A.
name: toy
r: 4
lora_alpha: 8
target_modules: null
dropout: null
modules_to_save: null
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy method in its three places: a module in a folder of the baselines package (a temporary folder put
    on the package's path), conf/adapter/toy.yaml (in a temporary copy of conf/) and its row in METHODS. Yields
    that conf/ folder."""
    code, conf = tmp_path / "code", tmp_path / "conf"
    code.mkdir()
    shutil.copytree(CONF.parent, conf)
    (code / "toy_method.py").write_text(textwrap.dedent(TOY_CODE))
    (conf / "adapter" / "toy.yaml").write_text(TOY_YAML)
    monkeypatch.setattr(baselines, "__path__", [*baselines.__path__, str(code)])
    monkeypatch.setitem(METHODS, "toy", (dict(r=4), 1e-2))
    yield conf
    ADAPTERS.pop("toy", None)
    sys.modules.pop("baselines.toy_method", None)
    from analysis.load import method_labels

    method_labels.cache_clear()


def test_a_method_added_in_three_places_passes_the_generic_table(toy, tmp_path):
    assert "toy" in baselines.methods(), "found in the package without being listed anywhere"
    test_every_registered_method_has_a_row()
    invariants = [f for name, f in sorted(globals().items())
                  if name.startswith("test_") and list(inspect.signature(f).parameters)[:1] == ["case"]]
    assert len(invariants) >= 9, [f.__name__ for f in invariants]
    for kind in ("decoder", "encoder"):
        case = Case("toy", kind)
        for f in invariants:
            extra = {"tmp_path": tmp_path / f"{f.__name__}-{kind}"} if "tmp_path" in inspect.signature(f).parameters else {}
            f(case, **extra)
    test_match_budget_hits_the_closest_achievable_percent("toy")
    cfg, loss, trainable = _build_from_yaml(toy / "adapter", "toy")
    assert cfg["name"] == "toy" and "r" in cfg and torch.isfinite(loss) and trainable > 0


def test_the_harness_and_analysis_take_an_added_method_unchanged(toy, tmp_path, monkeypatch):
    """experiments/train.py, the guard and analysis know nothing of the toy, and run it and name it."""
    from hydra import compose, initialize_config_dir

    import experiments  # noqa: F401  (the run_name resolver)
    from analysis.load import load_results
    from experiments.backbones import build_backbone
    from experiments.train import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with initialize_config_dir(config_dir=str(toy), version_base="1.3"):
        cfg = compose("train", overrides=[
            "backbone=tiny_encoder", "regime=bbc_news", "adapter=toy", "logger=none", "trainer.max_steps=2",
            "trainer.progress=false", "trainer.num_threads=1", "regime.n_train=16", "regime.n_val=8",
            "regime.n_test=8", "regime.max_length=32", "regime.train.batch_size=8", f"paths.root={tmp_path}"])
        results = run(cfg)  # inside: the run name is taken against this conf/ (experiments/naming.py)
    assert results["adapter"] == "toy" and results["run_name"].startswith("tiny_encoder__toy__bbc_news__r4__s")
    backbone = build_backbone(cfg.backbone, "classification", 5)[0]
    assert results["params"]["trainable"] == parameter_count(backbone, "toy", list(cfg.backbone.target_modules), r=4)
    df = load_results([tmp_path / "results"])
    assert list(df["method"]) == ["Toy"]
