"""ElaLoRA: AdaLoRA-style SVD adapters whose ranks are pruned AND expanded during training (HuandongChang/ElaLoRA).

    handle = apply_adapter(model, name="elalora", r=8, r_max=16, target_modules=["query", "value"])

ΔW = (α/r)·P diag(λ ⊙ m) Q with P (d_out × r_max), λ (r_max), Q (r_max × d_in) and a 0/1 rank
mask m: the first `r` components start active, λ = 0 so ΔW = 0 at init. Ranks change by MASKING,
never by resizing, so the optimizer built at the start stays valid (docs/SOURCES.md). Every `deltaT`
steps between `tinit` and `total - tfinal` (fractions of the run if < 1), `on_step`:
  1. updates AdaLoRA's importance of every component (EMA of |θ·∇θ| times its EMA uncertainty,
     summed over λ_i and the means over P[:, i], Q[i, :]) — it needs the grads, so the harness calls
     it after `optimizer.step()` and before `zero_grad()`;
  2. prunes the b globally least important active components (a module keeps at least one);
  3. activates one fresh component (λ = 0, so the function is unchanged) in each of the b modules
     of highest mean importance that have room. b decays linearly from `b_init` to 1.
The total active rank stays Σ r; the orthogonality penalty of AdaLoRA (weight `orth_reg_weight`)
is added to `outputs.loss` in training, as PEFT does for AdaLoRA.
Trainable parameters are allocated for r_max: count = r_max·(d_in + d_out + 1) per module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baselines.core import alpha_or_default, register, schedule_steps
from baselines.layers import SelfWrittenAdapted
from lrlora.layer import AdaptedLinear


class ElaLoRALinear(AdaptedLinear):
    def __init__(self, base_layer, r, r_max, lora_alpha=None, dropout=0.0):
        super().__init__(base_layer, dropout)
        w = base_layer.weight
        self.r, self.r_max = r, r_max
        self.scaling = alpha_or_default(r, lora_alpha) / r
        kw = dict(device=w.device, dtype=w.dtype)
        # AdaLoRA's init: P, Q ~ N(0, 0.02), λ = 0.
        self.lora_P = nn.Parameter(torch.randn(self.out_features, r_max, **kw) * 0.02)
        self.lora_Q = nn.Parameter(torch.randn(r_max, self.in_features, **kw) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r_max, **kw))
        mask = torch.zeros(r_max, **kw)
        mask[:r] = 1
        self.register_buffer("rank_mask", mask)

    def delta_weight(self):
        return self.scaling * (self.lora_P * (self.lora_E * self.rank_mask)) @ self.lora_Q

    def adapter_forward(self, x):
        h = F.linear(x, self.lora_Q.to(x.dtype)) * (self.lora_E * self.rank_mask).to(x.dtype)
        return self.scaling * F.linear(h, self.lora_P.to(x.dtype))

    def orth_penalty(self) -> torch.Tensor:
        on = self.rank_mask.bool()
        p, q = self.lora_P[:, on], self.lora_Q[on]
        eye = torch.eye(int(on.sum()), device=p.device, dtype=p.dtype)
        return ((p.T @ p - eye) ** 2).mean() + ((q @ q.T - eye) ** 2).mean()


@register("elalora")
class ElaLoRA(SelfWrittenAdapted):
    label = "ElaLoRA"

    @classmethod
    def parameters_per_module(cls, d_in, d_out, r=8, r_max=None, **_):
        return (2 * r if r_max is None else r_max) * (d_in + d_out + 1)  # allocated for r_max, masked below it

    def _apply(self, model, tinit=0.1, tfinal=0.2, deltaT=10, b_init=4, beta1=0.85, beta2=0.85,
               orth_reg_weight=0.5, **kwargs):
        self.sched = dict(tinit=tinit, tfinal=tfinal, deltaT=int(deltaT), b_init=int(b_init))
        self.beta1, self.beta2, self.orth_reg_weight = beta1, beta2, orth_reg_weight
        self._ipt, self._unc = {}, {}
        model = super()._apply(model, **kwargs)
        if orth_reg_weight:
            model.register_forward_hook(self._add_orth_penalty)
        return model

    def make_layer(self, name, linear, r=8, r_max=None, lora_alpha=None, dropout=0.0):
        return ElaLoRALinear(linear, r, 2 * r if r_max is None else r_max, lora_alpha, dropout)

    def _add_orth_penalty(self, module, args, output):
        if module.training and getattr(output, "loss", None) is not None:
            pen = sum(m.orth_penalty() for m in self.layers().values()) / len(self.layers())
            output.loss = output.loss + self.orth_reg_weight * pen
        return output

    # --- rank schedule ------------------------------------------------------------------------
    @torch.no_grad()
    def _update_importance(self):
        for name, m in self.layers().items():
            for key, p in (("E", m.lora_E), ("P", m.lora_P), ("Q", m.lora_Q)):
                if p.grad is None:
                    continue
                k = (name, key)
                ipt = (p * p.grad).abs()
                if k not in self._ipt:
                    self._ipt[k], self._unc[k] = torch.zeros_like(ipt), torch.zeros_like(ipt)
                self._ipt[k].mul_(self.beta1).add_((1 - self.beta1) * ipt)
                self._unc[k].mul_(self.beta2).add_((1 - self.beta2) * (ipt - self._ipt[k]).abs())

    def _scores(self, name) -> torch.Tensor | None:
        if (name, "E") not in self._ipt:
            return None
        s = {key: self._ipt[(name, key)] * self._unc[(name, key)] for key in ("E", "P", "Q")}
        return s["E"] + s["P"].mean(0) + s["Q"].mean(1)

    def _window(self, total_steps):
        return (schedule_steps(self.sched["tinit"], total_steps),
                total_steps - schedule_steps(self.sched["tfinal"], total_steps))

    @torch.no_grad()
    def on_step(self, step, total_steps):
        self._update_importance()
        start, end = self._window(total_steps)
        if not (start < step <= end) or step % self.sched["deltaT"]:
            return
        progress = (step - start) / max(1, end - start)
        b = max(1, round(self.sched["b_init"] * (1 - progress)))
        layers = self.layers()
        scores = {n: self._scores(n) for n in layers}
        if any(s is None for s in scores.values()):
            return
        # 1. prune the b least important active components, globally, keeping one per module
        cands = [(float(scores[n][i]), n, i) for n, m in layers.items()
                 for i in m.rank_mask.nonzero().flatten().tolist()]
        pruned = 0
        for _, n, i in sorted(cands):
            if pruned == b:
                break
            if layers[n].rank_mask.sum() > 1:
                layers[n].rank_mask[i] = 0
                pruned += 1
        # 2. expand the `pruned` most important modules that have room, one fresh component each
        room = [n for n, m in layers.items() if m.rank_mask.sum() < m.r_max]
        mean_ipt = {n: float((scores[n] * layers[n].rank_mask).sum() / layers[n].rank_mask.sum()) for n in room}
        for n in sorted(room, key=mean_ipt.get, reverse=True)[:pruned]:
            m = layers[n]
            i = int((m.rank_mask == 0).nonzero()[0])
            m.lora_E[i] = 0  # λ = 0: the new direction starts with no effect
            m.lora_P[:, i].normal_(0, 0.02)
            m.lora_Q[i].normal_(0, 0.02)
            m.rank_mask[i] = 1
            for key in ("E", "P", "Q"):  # the new component starts with no importance history
                t = self._ipt[(n, key)]
                sl = (slice(None), i) if key == "P" else (i,)
                t[sl] = 0
                self._unc[(n, key)][sl] = 0

    def training_state(self):
        return {"ipt": dict(self._ipt), "unc": dict(self._unc),
                "masks": {n: m.rank_mask.detach().cpu().clone() for n, m in self.layers().items()}}

    @torch.no_grad()
    def load_training_state(self, state):
        self._ipt, self._unc = dict(state["ipt"]), dict(state["unc"])
        for n, m in self.layers().items():
            m.rank_mask.copy_(state["masks"][n])

    def ranks(self) -> dict[str, int]:
        return {n: int(m.rank_mask.sum()) for n, m in self.layers().items()}

    def extra_results(self):
        return {"ranks": self.ranks()}
