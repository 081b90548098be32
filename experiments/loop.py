"""The training loop: AdamW, warmup + linear/cosine decay, clipping, periodic evaluation, early stopping,
best-by-validation weights, a stop on a non-finite loss, and exact resume. Called by experiments/train.py.

    loop = train(handle, data, collate, cfg, accelerator, tracker, out_dir, resume=True, t_start=t0,
                 callbacks=[SigmaSnapshots(...)])     # hooks are passed in (Callback), never swapped in

It reads top to bottom, as nanoGPT's train.py does: settings, optimizer, (resume), the loop, the end. All the
state that changes lives in one `LoopState`.

Checkpoints go through accelerate's `save_state`/`load_state` into {out_dir}/checkpoint/ (built aside and
swapped in by lrlora's atomic_directory, so a kill during a save leaves the previous checkpoint whole): the
trainable tensors (not the frozen backbone), optimizer, every process's RNG, the fp16 grad scaler, and as
registered custom state the scheduler, the LoopState, the best-by-validation weights and the adapter method's
own schedule state (AdaLoRA's importance scores, ElaLoRA's masks, DyLoRA's rank sampler). The batch order of an
epoch is a pure function of (seed, epoch), so a killed run restarted with the same command replays the same
batches with the same dropout masks and ends at the same weights. `checkpoint/checkpoint.json` (written last)
names the run's fingerprint and step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from experiments.protocols.forward import evaluate
from lrlora._atomic import atomic_directory, dumps_strict, recover_interrupted_swap
from lrlora.errors import CheckpointError, ConfigError, NonFiniteError

CHECKPOINT_META = "checkpoint.json"


@dataclass
class LoopState:
    """Everything the loop changes as it runs (saved in every checkpoint)."""

    step: int = 0                 # optimizer steps taken (skipped non-finite steps included)
    epoch: int = 0
    step_in_epoch: int = 0
    best: float | None = None     # best validation value of regime.train.metric so far
    best_step: int | None = None
    bad_evals: int = 0            # evaluations since the best (early stopping)
    stopped_early: bool = False
    updates: int = 0              # optimizer steps that changed the weights
    skipped_nonfinite: int = 0
    tokens: int = 0
    samples: int = 0
    train_time: float = 0.0       # seconds inside training steps
    wall_time: float = 0.0        # seconds since the run started, at the last checkpoint
    last_loss: float | None = None

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


@dataclass
class BestWeights:
    """The trainable tensors at the best validation step (CPU copies), checkpointed with the rest."""

    tensors: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return self.tensors

    def load_state_dict(self, d: dict) -> None:
        self.tensors = dict(d)


class MethodState:
    """The adapter method's own schedule state (baselines' training_state), as accelerate custom state."""

    def __init__(self, handle):
        self.handle = handle

    def state_dict(self) -> dict:
        return self.handle.training_state()

    def load_state_dict(self, d: dict) -> None:
        self.handle.load_training_state(d)


class Callback:
    """A hook into the loop, passed in: `train(..., callbacks=[...])` (as HF Trainer and Lightning take them);
    nothing is swapped onto the loop, the accelerator or the method handle at run time. Override what you need."""

    def on_step(self, step: int, total_steps: int) -> None:
        """After each optimizer step that changed the weights, after the method's own `handle.on_step`, before
        the gradients are zeroed; `step` is the 0-based index of the step just taken."""


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled index batches of one epoch; depends only on (seed, epoch), which makes resume exact."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def make_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    if schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    raise ValueError(f"unknown schedule {schedule!r}: use linear or cosine")


def is_better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def read_checkpoint_meta(ckpt_dir: Path) -> dict | None:
    """checkpoint.json of a complete checkpoint, None if there is none; CheckpointError if it is unreadable."""
    recover_interrupted_swap(ckpt_dir)
    path = Path(ckpt_dir) / CHECKPOINT_META
    if not Path(ckpt_dir).exists():
        return None
    try:
        meta = json.loads(path.read_text())
        int(meta["step"]), str(meta["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete or corrupt ({type(e).__name__}: {e}); "
                              f"pass trainer.force=true to retrain this configuration from the start") from None
    return meta


def verify_checkpoint(ckpt_dir: Path) -> None:
    """Read every file of a checkpoint once (they are adapter-sized) so a truncated one is reported before the
    run writes anything; CheckpointError names it."""
    from safetensors.torch import load_file

    from lrlora._atomic import verify_checksums

    for name in verify_checksums(ckpt_dir):  # a payload corrupted under an intact header would otherwise load
        raise CheckpointError(f"checkpoint file {Path(ckpt_dir) / name} is truncated or corrupt (its sha256 differs "
                              f"from the one recorded when it was saved); pass trainer.force=true to retrain this "
                              f"configuration from the start")
    for f in sorted(Path(ckpt_dir).iterdir()):
        try:
            if f.suffix == ".safetensors":
                load_file(f)
            elif f.suffix in (".bin", ".pkl", ".pt"):
                torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # safetensors, pickle, zip and EOF errors alike
            raise CheckpointError(f"checkpoint file {f} is truncated or corrupt ({type(e).__name__}); pass "
                                  f"trainer.force=true to retrain this configuration from the start") from None


def is_checkpoint(directory: Path) -> bool:
    return (Path(directory) / CHECKPOINT_META).is_file()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl rows logged after `step` (the checkpoint a resumed run restarts from): the resumed
    run logs them again, so each step appears once."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # a line cut by the kill
            continue
    from lrlora._atomic import atomic_write

    atomic_write(path, "".join(f"{line}\n" for line in keep))


def trainable_tensors(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def forward_backward(model, batches, n: int, accelerator) -> float:
    """The forward and backward passes of one optimizer step over its ``n`` micro-batches (an iterable of batches
    on the device, each scaled by 1/n); gradients are synchronised across processes on the last one only. Returns
    the summed loss. The training loop's step, and what ``benchmarks.workload`` times."""
    loss_sum = 0.0
    for j, batch in enumerate(batches):
        with accelerator.autocast(), (accelerator.no_sync(model) if j < n - 1 else nullcontext()):
            loss = model(**batch).loss / n
        accelerator.backward(loss)
        loss_sum += loss.item()
    return loss_sum


def apply_update(params, optimizer, scheduler, accelerator, grad_clip: float | None) -> None:
    """The update after a finite step: clip the gradient norm (when set), the optimizer's step, the schedule's."""
    if grad_clip:
        accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()


def train(handle, data, collate, cfg, accelerator, tracker, out_dir: Path, resume: bool = False,
          fingerprint: str = "", t_start: float | None = None, meta: dict | None = None,
          callbacks: tuple[Callback, ...] | list[Callback] = ()) -> dict:
    """Train handle.model on data.train, evaluating on data.val; returns the loop summary. `callbacks` are
    called after every optimizer step that changed the weights (Callback).

    cfg is the whole run config; optimisation settings come from cfg.regime.train (the paper's Table 10
    by domain), runtime ones from cfg.trainer. The best-by-validation weights are loaded at the end.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    tc, rt = cfg.regime.train, cfg.trainer
    world, rank = accelerator.num_processes, accelerator.process_index

    # --- the plan: batch sizes, steps, schedule ---------------------------------------------------------
    micro_bs = max(1, tc.batch_size // (rt.grad_accum * world))  # per process, per micro-batch
    global_micro = micro_bs * world
    micro_per_epoch = math.ceil(len(data.train) / global_micro)
    steps_per_epoch = math.ceil(micro_per_epoch / rt.grad_accum)
    total_steps = rt.max_steps or tc.epochs * steps_per_epoch
    eval_every = rt.eval_every or tc.get("eval_every") or steps_per_epoch
    save_every = rt.save_every or eval_every
    warmup = tc.get("warmup_steps") or int(tc.warmup_ratio * total_steps)
    lr = cfg.adapter.get("lr") or tc.lr  # an adapter may need its own lr (VeRA: 1e-2, docs/SOURCES.md)
    max_skipped = int(rt.get("max_skipped_nonfinite") or 0)

    # --- model, optimizer, schedule, and what a checkpoint holds -----------------------------------------
    model = handle.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    scheduler = make_scheduler(optimizer, tc.schedule, warmup, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    state, best = LoopState(), BestWeights()
    accelerator.register_for_checkpointing(scheduler, state, best, MethodState(handle))
    trainable_keys = {n for n, p in model.named_parameters() if p.requires_grad}

    def only_trainable(models, weights, output_dir):  # the frozen backbone is rebuilt, not checkpointed
        for i, w in enumerate(weights):
            weights[i] = {k: v for k, v in w.items() if k in trainable_keys}

    accelerator.register_save_state_pre_hook(only_trainable)
    ckpt_dir = out_dir / "checkpoint"

    def save_checkpoint():
        state.wall_time = time.perf_counter() - t_start
        info = {"fingerprint": fingerprint, "step": state.step, "wall_time": state.wall_time, **(meta or {})}
        with contextlib.ExitStack() as stack:
            tmp = [None]
            if accelerator.is_main_process:
                tmp[0] = str(stack.enter_context(atomic_directory(ckpt_dir, is_checkpoint, "checkpoint")))
            if world > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(tmp)
            accelerator.save_state(tmp[0])
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:  # written last: its presence marks a complete checkpoint
                (Path(tmp[0]) / CHECKPOINT_META).write_text(dumps_strict(info, indent=2))
        accelerator.wait_for_everyone()

    if resume:
        found = read_checkpoint_meta(ckpt_dir)
        try:
            accelerator.load_state(str(ckpt_dir), strict=False)
        except Exception as e:  # a truncated file: safetensors, pickle or torch errors of many types
            raise CheckpointError(f"checkpoint {ckpt_dir} is unreadable ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); pass trainer.force=true to "
                                  f"retrain this configuration from the start") from None
        if state.step != found["step"]:
            raise CheckpointError(f"checkpoint {ckpt_dir} is inconsistent (step {state.step} vs "
                                  f"{found['step']} in {CHECKPOINT_META}); pass trainer.force=true to retrain")
        accelerator.print(f"[resume] {ckpt_dir}: step {state.step}/{total_steps}")

    # --- the loop -----------------------------------------------------------------------------------------
    val = data.val[: rt.eval_max_examples] if rt.eval_max_examples else data.val
    model.train()
    bar = tqdm(total=total_steps, initial=state.step, desc=cfg.run_name,
               disable=not (rt.progress and accelerator.is_main_process), dynamic_ncols=True)
    while state.step < total_steps and not state.stopped_early:
        micro = epoch_batches(len(data.train), global_micro, cfg.seed, state.epoch)
        groups = [micro[i:i + rt.grad_accum] for i in range(0, len(micro), rt.grad_accum)]
        for group in groups[state.step_in_epoch:]:
            t0 = time.perf_counter()

            def micro_batches(group=group):
                for idx in group:
                    # Each process takes its slice of the global micro-batch: multi-GPU needs no sampler.
                    batch = collate([data.train[i] for i in idx[rank * micro_bs:(rank + 1) * micro_bs]])
                    batch = {k: v.to(device) for k, v in batch.items()}
                    if "attention_mask" in batch:
                        state.tokens += int(batch["attention_mask"].sum()) * world
                    yield batch

            loss_sum = forward_backward(model, micro_batches(), len(group), accelerator)
            if math.isfinite(loss_sum):
                apply_update(params, optimizer, scheduler, accelerator, tc.grad_clip)
                handle.on_step(state.step, total_steps)  # AdaLoRA's allocator reads the grads: before zero_grad
                for callback in callbacks:
                    callback.on_step(state.step, total_steps)
                state.updates += 1
                state.last_loss = loss_sum
            else:  # like AMP's grad scaler: skip the update, up to trainer.max_skipped_nonfinite times
                state.skipped_nonfinite += 1
                scheduler.step()
                if state.skipped_nonfinite > max_skipped:
                    raise NonFiniteError(
                        f"training loss is {loss_sum} at step {state.step + 1} of {cfg.run_name} (after "
                        f"{state.skipped_nonfinite - 1} skipped non-finite steps); nothing was recorded. Try a "
                        f"lower learning rate (regime.train.lr), gradient clipping (regime.train.grad_clip), "
                        f"trainer.precision=no or bf16, or trainer.max_skipped_nonfinite=N to skip such steps")
                tracker.log({"skipped_nonfinite": state.skipped_nonfinite}, step=state.step + 1)
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.step_in_epoch += 1
            state.samples += sum(len(ix) for ix in group)  # in this optimizer step, all processes
            state.train_time += time.perf_counter() - t0
            bar.update(1)
            if (state.step % rt.log_every == 0 or state.step == 1) and math.isfinite(loss_sum):
                tracker.log({"train_loss": loss_sum, "lr": scheduler.get_last_lr()[0], "epoch": state.epoch},
                            step=state.step)
                bar.set_postfix(loss=f"{loss_sum:.4f}")

            last = state.step >= total_steps
            if state.step % eval_every == 0 or last:
                try:
                    m = evaluate(model, val, collate, cfg.regime.task, micro_bs * 2, device, accelerator.autocast)
                except NonFiniteError:  # a NaN validation loss is a diverged run, like a NaN training loss
                    raise NonFiniteError(f"validation loss is not finite at step {state.step} of {cfg.run_name}: the "
                                         f"model diverged and nothing was recorded; try a lower regime.train.lr, "
                                         f"gradient clipping (regime.train.grad_clip) or trainer.precision=no") from None
                m = {"val_loss" if k == "loss" else f"val_{k}": v for k, v in m.items()}
                key = tc.metric if tc.metric in m else f"val_{tc.metric}"
                if key not in m:
                    raise ConfigError(f"validation gave no {tc.metric!r} (it gave {sorted(m)}); set "
                                         f"regime.train.metric to one of those")
                value = m[key]
                if not math.isfinite(value):
                    raise NonFiniteError(f"validation {tc.metric} is {value} at step {state.step} of "
                                         f"{cfg.run_name}; the model diverged: try a lower regime.train.lr")
                if is_better(value, state.best, tc.metric_mode):
                    state.best, state.best_step, state.bad_evals = value, state.step, 0
                    best.tensors = trainable_tensors(accelerator.unwrap_model(model))
                else:
                    state.bad_evals += 1
                tracker.log({**m, "best": state.best}, step=state.step)
                if tc.get("patience") and state.bad_evals >= tc.patience:
                    state.stopped_early = True
            if state.step_in_epoch == len(groups):  # epoch done: a checkpoint taken now resumes at the next
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            if state.step % save_every == 0 or last or state.stopped_early:
                save_checkpoint()
            if last or state.stopped_early:
                break
    bar.close()

    # --- the end: best-by-validation weights for the test -------------------------------------------------
    if state.updates == 0:
        raise NonFiniteError(f"{cfg.run_name} took no optimizer step that changed the weights; nothing to report")
    params_by_name = dict(accelerator.unwrap_model(model).named_parameters())
    with torch.no_grad():
        for n, t in best.tensors.items():
            params_by_name[n].copy_(t)
    return {**state.state_dict(), "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "epochs_planned": math.ceil(total_steps / steps_per_epoch), "eval_every": eval_every, "lr": lr,
            "warmup_steps": warmup, "micro_batch_size": micro_bs}
