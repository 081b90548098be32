"""Metrics out of a run: always a local metrics.jsonl; W&B too unless logger=none.

    tracker = Tracker(cfg, out_dir, config_dict)  ...  tracker.log({"train_loss": 0.3}, step=10)
    tracker.summary({...}); tracker.log_figure("transfer_functions", fig); tracker.finish()

Without a W&B key (WANDB_API_KEY or ~/.netrc) W&B runs in offline mode and the run ends by printing
the `wandb sync` command. Never prompts for a key.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from lrlora._atomic import atomic_write


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_mode(cfg_mode: str | None) -> str:
    """Config mode, else WANDB_MODE, else online with a key and offline without."""
    return cfg_mode or os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")


def flat_config(config: dict) -> dict:
    """{"adapter.r": 16, ...}: one level, so a W&B table or filter can use any setting as a column."""
    from experiments.identity import flatten

    return flatten(config)


def wandb_grouping(cfg) -> tuple[str, str, list[str]]:
    """(group, job_type, tags) so a W&B dashboard filtered by table shows the rows analysis/ builds:
    group = the paper table a run was tagged for (`tags=[table3]`, set by conf/sweep/table*.yaml and
    analysis.reproduce), else the experiment file, else backbone__regime; job_type = the method; tags = the
    config's tags + `row:<method>-r<r>` + one `<setting>=<value>` per result-affecting override (the run
    name's suffix), e.g. `center=true`."""
    tags = [str(t) for t in (cfg.get("tags") or [])]
    table = next((t for t in tags if t.startswith("table")), None)
    experiment = None
    try:
        from hydra.core.hydra_config import HydraConfig

        experiment = HydraConfig.get().runtime.choices.get("experiment")
    except (ImportError, ValueError):  # composed without @hydra.main (demo, tests): no runtime choices
        pass
    group = cfg.logger.get("group") or table or experiment or f"{cfg.backbone.name}__{cfg.regime.name}"
    from experiments.naming import suffix_parts

    variant = suffix_parts(cfg)
    return group, str(cfg.adapter.name), [*tags, f"row:{cfg.adapter.name}-r{cfg.adapter.get('r')}", *variant]


class SigmaSnapshots:
    """Snapshots of every LR-LoRA transfer function σ at chosen optimizer steps (App. I, analysis' fig_sigma):
    {out_dir}/sigma_snapshots.json = {"x": grid, "modules": {name: {type, layer}}, "steps": {step: {name: σ(x)}}}.
    A loop callback (experiments.loop.Callback: `train(..., callbacks=[SigmaSnapshots(...)])`);
    `trainer.sigma_snapshots=[100,1000,2000]` turns it on. A resumed run keeps earlier snapshots."""

    def __init__(self, handle, out_dir: Path, steps, target_modules=None, points: int = 201):
        from lrlora import lrlora_modules

        self.steps = {int(s) for s in steps or ()}
        self.modules = lrlora_modules(handle.model) if self.steps else {}
        self.path = Path(out_dir) / "sigma_snapshots.json"
        self.points, self.targets = points, target_modules

    def on_step(self, step: int, total_steps: int) -> None:
        if self.modules and step + 1 in self.steps:  # the loop passes the index of the step just taken (0-based)
            self.snapshot(step + 1)

    def snapshot(self, step: int) -> None:
        import torch

        from experiments.results import module_type
        from lrlora import layer_index

        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        L = max(m.transfer.spec.L for m in self.modules.values())
        x = torch.linspace(-L, L, self.points)
        with torch.no_grad():
            curves = {n: m.transfer.evaluate(x).float().tolist() for n, m in self.modules.items()}
        data.setdefault("x", x.tolist())
        data.setdefault("modules", {n: {"type": module_type(n, self.targets), "layer": layer_index(n)}
                                    for n in self.modules})
        data.setdefault("steps", {})[str(step)] = curves
        atomic_write(self.path, json.dumps(data))


class Tracker:
    def __init__(self, cfg, out_dir: Path, config: dict, enabled: bool = True):
        self.enabled = enabled  # False on non-main processes
        self.jsonl = (out_dir / "metrics.jsonl").open("a") if enabled else None
        self.run = None
        if enabled and cfg.logger.name == "wandb":
            import wandb

            self.mode = wandb_mode(cfg.logger.get("mode"))
            # The id follows the run name, so a resumed run continues the same W&B run.
            run_id = "".join(c if c.isalnum() or c in "-_" else "-" for c in cfg.run_name)[:120]
            group, job_type, tags = wandb_grouping(cfg)
            self.run = wandb.init(project=cfg.logger.project, entity=cfg.logger.get("entity"), name=cfg.run_name,
                                  id=run_id, resume="allow", group=group, job_type=job_type,
                                  config=flat_config(config), tags=tags, dir=str(out_dir), mode=self.mode,
                                  settings=wandb.Settings(silent=True))

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        self.jsonl.write(json.dumps({"step": step, **{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                                      for k, v in clean.items()}}) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            self.run.log(clean, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def log_table(self, key: str, columns: list, rows: list) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_figure(self, key: str, path: Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def finish(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.run is not None:
            run_dir = self.run.dir
            self.run.finish()
            if self.mode == "offline":
                print(f"[wandb] offline run saved; upload it with: wandb sync {Path(run_dir).parent}")


def plot_transfer_functions(model, path: Path, target_modules=None, points: int = 400) -> Path | None:
    """σ_l(x) of every LR-LoRA module on [-L, L], coloured by module type; None for other adapters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from experiments.results import module_type
    from lrlora import lrlora_modules

    modules = lrlora_modules(model)
    if not modules:
        return None
    types = sorted({module_type(n.split(".lrlora_layer.")[0], target_modules) for n in modules})
    colours = {t: plt.cm.tab10(i % 10) for i, t in enumerate(types)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for name, layer in modules.items():
        name = name.split(".lrlora_layer.")[0]  # under PEFT (lrlora.peft) each adapter sits one level down
        tf = layer.transfer
        L = tf.spec.L
        x = torch.linspace(-L, L, points)
        with torch.no_grad():
            y = tf.evaluate(x).float()
        t = module_type(name, target_modules)
        ax.plot(x, y, color=colours[t], alpha=0.5, lw=1, label=None if t in seen else t)
        seen.add(t)
    ax.set(xlabel="x = (BA)_ij", ylabel="σ(x)", title=f"learned transfer functions ({len(modules)} modules)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
