"""Significance as the paper reports it (Sec. 4.1, App. B.2): paired t-tests of a method against LoRA, paired
by seed (one cell) or by task (an average over tasks), Holm–Bonferroni corrected across the family; and what the
pre-registered decision rules (analysis/verdicts.py) add: the equivalence test (TOST) and a test slice's chance.

    t, p = paired_ttest(ours_by_seed, lora_by_seed)          # scipy.stats.ttest_rel
    reject, p_holm = holm([p_task1, p_task2, ...])           # statsmodels multipletests(method="holm")
    p = tost(para_by_seed, lora_by_seed, margin=1.0)         # |mean difference| < 1 point, two one-sided t-tests
    pct, n = chance(run_config["regime"], "data")            # accuracy of guessing on the run's own test slice
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np


def mean_std(values) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (ddof=1; None for a single run) and count, NaN/None dropped."""
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if len(v) == 0:
        return None, None, 0
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None), len(v)


def paired_ttest(a, b) -> tuple[float | None, float | None]:
    """Two-sided paired t-test of a against b (same order: same seed or same task). None when fewer than two
    pairs, or when every difference is equal (the t statistic is undefined)."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) != len(b):
        raise ValueError(f"paired t-test needs pairs: got {len(a)} and {len(b)} values")
    d = a - b
    if len(a) < 2 or np.allclose(d, d[0]):
        return None, None
    res = stats.ttest_rel(a, b)
    return float(res.statistic), float(res.pvalue)


def holm(pvalues, alpha: float = 0.05) -> tuple[list[bool | None], list[float | None]]:
    """Holm–Bonferroni over the p-values that exist (None stays None): (reject at alpha, corrected p)."""
    from statsmodels.stats.multitest import multipletests

    idx = [i for i, p in enumerate(pvalues) if p is not None]
    reject: list[bool | None] = [None] * len(pvalues)
    corrected: list[float | None] = [None] * len(pvalues)
    if idx:
        rej, p_adj, _, _ = multipletests([pvalues[i] for i in idx], alpha=alpha, method="holm")
        for i, r, p in zip(idx, rej, p_adj):
            reject[i], corrected[i] = bool(r), float(p)
    return reject, corrected


def paired_ci(a, b, level: float = 0.95) -> tuple[float | None, float | None, float | None, int]:
    """Mean of the paired differences a − b and its t-interval at `level`: (mean, lo, hi, n); lo/hi None with
    one pair, everything None with none."""
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    if n == 0:
        return None, None, None, 0
    if n == 1:
        return float(d[0]), None, None, 1
    half = stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), n


def tost(a, b, margin: float) -> float | None:
    """Two one-sided t-tests of the paired differences a − b against ±margin (equivalence: −margin < mean <
    margin): the larger of the two one-sided p-values. None when fewer than two pairs, or when every difference
    is equal (the t statistics are undefined)."""
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2 or np.allclose(d, d[0]):
        return None
    above = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    below = stats.ttest_1samp(d, margin, alternative="less").pvalue
    return float(max(above, below))


def chance(regime: dict, data_dir: str, split: str = "test", store: Path | None = None) -> tuple[float, int]:
    """Chance accuracy (%) on a run's own `split` slice, through the harness's loader and caps, and its number of
    questions: option regimes (pairs tied by `group`) score the best option per question, so chance is the mean
    of 1/k over the questions; other regimes, the share of the most frequent label. Cached per regime; with
    `store` (a JSON file beside a round's results), also kept there, keyed by the regime's name and a hash of its
    settings, so that a report rebuilds the same numbers on a machine without the data (CI)."""
    text = json.dumps(regime, sort_keys=True, default=str)
    key = f"{regime.get('name')}:{hashlib.sha256(text.encode()).hexdigest()[:12]}:{split}"
    kept = json.loads(store.read_text()) if store is not None and store.exists() else {}
    if key in kept:
        return tuple(kept[key])
    value = _chance(text, str(data_dir), split)
    if store is not None:
        from lrlora._atomic import atomic_json

        atomic_json(store, {**kept, key: list(value)}, indent=1, sort_keys=True)
    return value


@cache
def _chance(regime_json: str, data_dir: str, split: str) -> tuple[float, int]:
    from omegaconf import OmegaConf

    from experiments.data import load_splits

    data = getattr(load_splits(OmegaConf.create(json.loads(regime_json)), data_dir), split)
    if any("group" in ex for ex in data):
        sizes = Counter(ex["group"] for ex in data)
        return 100 * sum(1 / k for k in sizes.values()) / len(sizes), len(sizes)
    if not data or any("label" not in ex for ex in data):
        raise ValueError(f"chance is defined for labelled test sets; regime {json.loads(regime_json).get('name')!r} "
                         f"has none")
    return 100 * max(Counter(ex["label"] for ex in data).values()) / len(data), len(data)
