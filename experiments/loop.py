"""The training loop: AdamW, warmup + linear/cosine decay, clipping, periodic evaluation, early stopping,
best-checkpoint selection, and exact resume. Called by experiments/train.py; reads top to bottom.

Exact resume: every `save_every` optimizer steps the loop writes checkpoint/state.pt (atomic) with the
trainable tensors, optimizer, scheduler, RNG states and its position (epoch, step in epoch). The batch
order of an epoch is a pure function of (seed, epoch), so a killed run restarted with the same command
replays the same batches with the same dropout masks and ends at the same loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from experiments.protocols.forward import evaluate


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled index batches of one epoch; depends only on (seed, epoch), which makes resume exact."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill during the write leaves the previous checkpoint intact


def config_fingerprint(cfg) -> str:
    """Hash of everything that shapes the training trajectory (not runtime knobs, paths or the logger)."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    trainer = {k: v for k, v in c.get("trainer", {}).items() if k in ("max_steps", "grad_accum")}
    keep = {k: c.get(k) for k in ("backbone", "regime", "adapter", "seed")}
    return hashlib.sha256(json.dumps({**keep, "trainer": trainer}, sort_keys=True, default=str).encode()).hexdigest()


def make_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    if schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    raise ValueError(f"unknown schedule {schedule!r}: use linear or cosine")


def is_better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def train(handle, data, collate, cfg, accelerator, tracker, out_dir: Path) -> dict:
    """Train handle.model on data.train, evaluating on data.val; returns the loop summary.

    cfg is the whole run config; optimisation settings come from cfg.regime.train (the paper's Table 10
    by domain), runtime ones from cfg.trainer. The best-by-validation weights are loaded at the end.
    """
    tc, rt = cfg.regime.train, cfg.trainer
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_bs = max(1, tc.batch_size // (rt.grad_accum * world))  # per process, per micro-batch
    global_micro = micro_bs * world
    micro_per_epoch = math.ceil(len(data.train) / global_micro)
    steps_per_epoch = math.ceil(micro_per_epoch / rt.grad_accum)
    total_steps = rt.max_steps or tc.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    eval_every = rt.eval_every or tc.get("eval_every") or steps_per_epoch
    save_every = rt.save_every or eval_every
    warmup = tc.get("warmup_steps") or int(tc.warmup_ratio * total_steps)
    lr = cfg.adapter.get("lr") or tc.lr  # an adapter may need its own lr (VeRA: 1e-2, BASELINES.md)

    model = handle.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    scheduler = make_scheduler(optimizer, tc.schedule, warmup, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    ckpt_dir = out_dir / "checkpoint"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    s = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best": None, "best_step": None, "bad_evals": 0,
         "stopped_early": False, "tokens": 0, "samples": 0, "train_time": 0.0, "last_loss": None}
    fingerprint = config_fingerprint(cfg)
    if rt.resume and (ckpt_dir / "state.pt").exists():
        ck = torch.load(ckpt_dir / "state.pt", weights_only=False)
        if ck.get("fingerprint") != fingerprint:  # run names omit most settings: never resume a different run
            raise RuntimeError(
                f"{ckpt_dir / 'state.pt'} was written by a run with another config under the same run name "
                f"{cfg.run_name!r}. Delete {ckpt_dir}, pass trainer.resume=false to start over, or give this "
                f"variant its own name (run_name=...)")
        load_trainable_state(accelerator.unwrap_model(model), ck["trainable"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        s = ck["loop"]
        accelerator.print(f"[resume] {ckpt_dir / 'state.pt'}: step {s['step']}/{total_steps}")

    def save_checkpoint():
        if accelerator.is_main_process:
            atomic_save({"trainable": trainable_state(accelerator.unwrap_model(model)),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "rng": rng_state(), "loop": s, "fingerprint": fingerprint}, ckpt_dir / "state.pt")

    def run_eval():
        val = data.val[: rt.eval_max_examples] if rt.eval_max_examples else data.val
        m = evaluate(model, val, collate, cfg.regime.task, micro_bs * 2, device, accelerator.autocast)
        m = {"val_loss" if k == "loss" else f"val_{k}": v for k, v in m.items()}
        value = m[tc.metric] if tc.metric in m else m[f"val_{tc.metric}"]
        if is_better(value, s["best"], tc.metric_mode):
            s.update(best=value, best_step=s["step"], bad_evals=0)
            if accelerator.is_main_process:
                atomic_save(trainable_state(accelerator.unwrap_model(model)), ckpt_dir / "best.pt")
        else:
            s["bad_evals"] += 1
        tracker.log({**m, "best": s["best"]}, step=s["step"])
        return value

    model.train()
    bar = tqdm(total=total_steps, initial=s["step"], desc=cfg.run_name, disable=not (rt.progress and
               accelerator.is_main_process), dynamic_ncols=True)
    while s["step"] < total_steps and not s["stopped_early"]:
        micro = epoch_batches(len(data.train), global_micro, cfg.seed, s["epoch"])
        groups = [micro[i:i + rt.grad_accum] for i in range(0, len(micro), rt.grad_accum)]
        for group in groups[s["step_in_epoch"]:]:
            t0 = time.perf_counter()
            n_examples = sum(len(ix) for ix in group)  # in this optimizer step, all processes
            loss_sum = 0.0
            for j, idx in enumerate(group):
                # Each process takes its slice of the global micro-batch: multi-GPU needs no sampler.
                batch = collate([data.train[i] for i in idx[rank * micro_bs:(rank + 1) * micro_bs]])
                batch = {k: v.to(device) for k, v in batch.items()}
                if "attention_mask" in batch:
                    s["tokens"] += int(batch["attention_mask"].sum()) * world
                sync = j == len(group) - 1
                with accelerator.autocast(), (accelerator.no_sync(model) if not sync else nullcontext()):
                    loss = model(**batch).loss / len(group)
                accelerator.backward(loss)
                loss_sum += loss.item()
            if tc.grad_clip:
                accelerator.clip_grad_norm_(params, tc.grad_clip)
            optimizer.step()
            scheduler.step()
            handle.on_step(s["step"], total_steps)  # AdaLoRA's allocator reads the grads: before zero_grad
            optimizer.zero_grad(set_to_none=True)
            s["step"] += 1
            s["step_in_epoch"] += 1
            s["samples"] += n_examples
            s["last_loss"] = loss_sum
            s["train_time"] += time.perf_counter() - t0
            bar.update(1)
            if s["step"] % rt.log_every == 0 or s["step"] == 1:
                tracker.log({"train_loss": loss_sum, "lr": scheduler.get_last_lr()[0], "epoch": s["epoch"]},
                            step=s["step"])
                bar.set_postfix(loss=f"{loss_sum:.4f}")
            last = s["step"] >= total_steps
            if s["step"] % eval_every == 0 or last:
                run_eval()
                if tc.get("patience") and s["bad_evals"] >= tc.patience:
                    s["stopped_early"] = True
            if s["step_in_epoch"] == len(groups):  # epoch done: a checkpoint taken now resumes at the next
                s.update(epoch=s["epoch"] + 1, step_in_epoch=0)
            if s["step"] % save_every == 0 or last or s["stopped_early"]:
                save_checkpoint()
            if last or s["stopped_early"]:
                break
    bar.close()
    if (ckpt_dir / "best.pt").exists():  # best-by-validation weights for the final test evaluation
        load_trainable_state(accelerator.unwrap_model(model), torch.load(ckpt_dir / "best.pt"))
    return {**s, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "epochs_planned": epochs,
            "eval_every": eval_every, "lr": lr, "warmup_steps": warmup, "micro_batch_size": micro_bs}
