"""Several processes: `accelerate launch --multi_gpu --num_processes 2 -m experiments.train …` on CPU runs two
gloo processes (the harness's Accelerator takes the CPU when there is no GPU) and trains to the same
model as one process with the same global batch. (`accelerate launch --cpu --num_processes 2` is not
this: accelerate's simple launcher starts ONE process for --cpu.)"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

# A decoder (no dropout anywhere) on a classification task (loss = mean over examples, so the mean of
# the two processes' half-batch losses is the one-process loss): DDP's averaged gradient is then the
# one-process gradient exactly, up to float summation order.
COMMON = ["backbone=tiny_decoder", "regime=bbc_news", "adapter=lrlora", "adapter.r=2", "logger=none",
          "trainer.max_steps=4", "trainer.progress=false", "trainer.num_threads=1", "regime.n_train=16",
          "regime.n_val=8", "regime.n_test=8", "regime.max_length=32", "regime.train.batch_size=8",
          "regime.adapter_dropout=0", "regime.train.lr=5e-3"]
RUN = "tiny_decoder__lrlora__bbc_news__r2__s42__multiprocess"
COMMON.append(f"run_name={RUN}")  # one name for both launches (names otherwise carry the overrides' suffix)


def _run(cmd, root):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*cmd, *COMMON, f"paths.root={root}"], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((root / "results" / f"{RUN}.json").read_text())
    return res, load_file(root / "runs" / RUN / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(tmp_path):
    one, w1 = _run([sys.executable, "-m", "experiments.train"], tmp_path / "one")
    two, w2 = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "-m", "experiments.train"], tmp_path / "two")
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["metrics"]["train"]["steps"] == two["metrics"]["train"]["steps"] == 4
    assert two["metrics"]["glue"]["loss"] == pytest.approx(one["metrics"]["glue"]["loss"], rel=1e-4)
    assert w1.keys() == w2.keys()
    moved = False
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6), k
        moved |= "transfer" in k and bool(w1[k].abs().max() > 0)
    assert moved, "the adapters should have trained (amplitudes start at 0)"
