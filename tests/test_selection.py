"""The second round's pre-registered selection rules (analysis/selection.py, `select:` of analysis/rules/round2.yaml)
on hand-made run tables whose right answers are known, and the grid runner's `@key` steps (analysis/reproduce.py,
`reproduction2:` of analysis/scales.yaml): a step waits for its value, a null value drops its arm, a chosen value
never moves."""

import pandas as pd
import pytest

from analysis import selection
from analysis.reproduce import ReproduceError, Waiting, fill, reproduction_plan
from analysis.selection import evaluate, load_rules

RULES = load_rules()
SUITE = RULES["select"]["tasks"]["suite"]
CHANCE = {"cs_boolq": 62.0, "cs_piqa": 50.0, "cs_social_i_qa": 33.3, "cs_hellaswag": 25.0, "cs_winogrande": 50.0,
          "cs_arc_easy": 25.0, "cs_arc_challenge": 25.0, "cs_openbookqa": 25.0, "bbc_news": 20.0}


@pytest.fixture(autouse=True)
def known_chance(monkeypatch):
    monkeypatch.setattr(selection, "val_chance", lambda row, data_dir: CHANCE[row["regime"]])


def run(regime, best_val, adapter="lora", seed=1, lr=1e-3, pooling="cls", pre_scale=1.0, share="none",
        energy=None, resid=None, center=True, post_scale=1.0):
    return {"adapter": adapter, "seed": seed, "r": 4, "regime": regime, "config.regime.train.lr": lr,
            "config.backbone.pooling": pooling, "metrics.train.best_val": best_val / 100,
            "config.adapter.center": center if adapter == "lrlora" else None,
            "config.adapter.pre_scale": pre_scale if adapter == "lrlora" else None,
            "config.adapter.post_scale": post_scale if adapter == "lrlora" else None,
            "config.adapter.share": share if adapter == "lrlora" else None,
            "mechanism.summary.energy_beyond_r.median": energy, "mechanism.summary.linear_residual.median": resid,
            "path": None}


def pilot(excess_cls: dict, excess_mean: dict) -> list[dict]:
    """Both heads on every candidate task, best validation = chance + the given excess (0 when not given)."""
    rows = []
    for head, excess in (("cls", excess_cls), ("mean", excess_mean)):
        for regime in [*SUITE, "bbc_news"]:
            rows.append(run(regime, CHANCE[regime] + excess.get(regime, 0.0), pooling=head))
    return rows


def choose(rows, chosen=None):
    return evaluate(RULES, pd.DataFrame(rows), chosen or {}, "data")[0]


def test_the_head_with_fewer_collapses_wins_then_the_higher_excess_then_cls():
    everything = {r: 5.0 for r in [*SUITE, "bbc_news"]}
    # mean collapses on one task fewer (its piqa is 3 points above chance, cls's is 1): mean, despite cls's
    # higher excess elsewhere
    assert choose(pilot({**everything, "cs_piqa": 1.0, "cs_boolq": 30.0}, {**everything, "cs_piqa": 3.0}))["head"] == "mean"
    # same collapses, mean ahead by 1 point on average over 9 tasks (9 points on one): mean
    assert choose(pilot(everything, {**everything, "cs_boolq": 14.0}))["head"] == "mean"
    # same collapses, within 0.5 points: the model's own head
    assert choose(pilot(everything, {**everything, "cs_boolq": 9.0}))["head"] == "cls"


def test_tasks_rank_by_excess_among_those_between_chance_plus_7_and_95():
    excess = {"cs_piqa": 12.0, "cs_social_i_qa": 20.0, "cs_winogrande": 6.9, "cs_arc_easy": 71.0, "bbc_news": 60.0}
    chosen = choose(pilot(excess, excess))
    # exactly 7 points above chance passes, though 100 * 0.57 - 50 is 6.99999999999999 in floating point
    rows = pilot({}, {})
    for row in rows:
        if row["regime"] == "cs_piqa":
            row["metrics.train.best_val"] = 0.57
    assert 100 * 0.57 - CHANCE["cs_piqa"] < 7.0
    assert (choose(rows)["task_a"], choose(rows)["task_b"]) == ("cs_piqa", None)
    # arc_easy at 96% is above the ceiling; winogrande 6.9 points is under the margin; bbc_news is a fill-in only
    assert (chosen["task_a"], chosen["task_b"], chosen["smollm2_primary"]) == ("cs_social_i_qa", "cs_piqa", False)


def test_fewer_than_two_suite_tasks_bring_in_the_fill_and_smollm2_as_primary():
    excess = {"cs_piqa": 12.0, "bbc_news": 40.0}
    chosen = choose(pilot(excess, excess))
    assert (chosen["task_a"], chosen["task_b"], chosen["smollm2_primary"]) == ("cs_piqa", "bbc_news", True)


def test_a_missing_pilot_run_keeps_every_later_key_unchosen():
    rows = pilot({"cs_piqa": 12.0}, {})[:-1]  # the last (mean, bbc_news) not in yet
    assert choose(rows) == {}


def engage_rows(lora_val, settings):
    rows = pilot({"cs_piqa": lora_val - 50.0, "cs_social_i_qa": 10.0}, {})
    for s, (val, energy, resid) in settings.items():
        rows.append(run("cs_piqa", val, adapter="lrlora", pre_scale=s, energy=energy, resid=resid))
    return rows


def test_the_engaged_scale_is_the_smallest_that_engages_and_trains():
    chosen = choose(engage_rows(70.0, {10.0: (70.0, 1e-3, 0.5),      # trains, does not engage
                                       30.0: (66.0, 0.05, 0.2),      # engages, 4 points under LoRA: does not train
                                       100.0: (67.5, 0.05, 0.2)}))   # both
    assert chosen["task_a"] == "cs_piqa" and chosen["engaged_pre_scale"] == 100.0
    assert chosen["primary_pre_scale"] == 100.0


def test_no_engaging_setting_is_a_null_and_the_centred_arm_becomes_primary():
    chosen = choose(engage_rows(70.0, {10.0: (70.0, 1e-3, 0.5), 30.0: (60.0, 0.05, 0.2), 100.0: (50.0, 0.3, 0.6)}))
    assert chosen["engaged_pre_scale"] is None and chosen["primary_pre_scale"] == 1.0


def lr_rows(means: dict, engaged=100.0):
    """Each arm at each rate, seeds 1 and 2 at mean -/+ 1; LoRA's seed 1 at 1e-3 on task_a is the pilot's run."""
    lora_pilot = means["lora"][1e-3] - 1.0
    rows = engage_rows(lora_pilot, {10.0: (70.0, 1e-3, 0.5), 30.0: (60.0, 0.05, 0.2), 100.0: (69.0, 0.3, 0.6)})
    for arm, by_lr in means.items():
        for lr, mean in by_lr.items():
            for seed, d in ((1, -1.0), (2, 1.0)):
                if arm == "lora" and seed == 1 and lr == 1e-3:
                    continue  # the same run as the pilot's
                if arm == "engaged" and seed == 1 and lr == 1e-3:
                    continue  # the engage pilot's run at the chosen scale
                kw = dict(adapter="lora") if arm == "lora" else dict(
                    adapter="lrlora", pre_scale=1.0 if arm == "centred" else engaged)
                rows.append(run("cs_piqa", mean + d, seed=seed, lr=lr, **kw))
    return rows


def test_each_arm_takes_its_best_rate_and_the_smaller_within_half_a_point():
    chosen = choose(lr_rows({"lora": {3e-4: 60.0, 1e-3: 70.0, 3e-3: 65.0},
                             "centred": {3e-4: 71.0, 1e-3: 71.4, 3e-3: 50.0},   # within 0.5: the smaller
                             "engaged": {3e-4: 60.0, 1e-3: 70.0, 3e-3: 72.0}}))
    assert (chosen["lr_lora"], chosen["lr_centred"], chosen["lr_engaged"]) == (1e-3, 3e-4, 3e-3)
    assert chosen["lr_primary"] == 3e-3


def test_the_post_scaled_arm_takes_its_own_rate_and_moves_no_earlier_choice():
    # Addendum A: its selection runs (s = 10, post_scale 0.1) beside a finished selection; its seed-1 run at
    # lr 1e-3 has the engage pilot's s = 10 and rate but is not one of that rule's runs
    means = {"lora": {3e-4: 60.0, 1e-3: 70.0, 3e-3: 65.0}, "centred": {3e-4: 71.0, 1e-3: 71.4, 3e-3: 50.0},
             "engaged": {3e-4: 60.0, 1e-3: 70.0, 3e-3: 72.0}}
    rows = lr_rows(means)
    before = choose(rows)
    post = {3e-4: 55.0, 1e-3: 69.0, 3e-3: 69.4}  # 3e-3 best, 1e-3 within 0.5: the smaller
    for lr, mean in post.items():
        for seed, d in ((1, -1.0), (2, 1.0)):
            rows.append(run("cs_piqa", mean + d, adapter="lrlora", seed=seed, lr=lr, pre_scale=10.0, post_scale=0.1,
                            energy=0.12, resid=0.29))
    # chosen afresh, every earlier key is as before (the engaged rule reads post_scale 1 runs only: with the new
    # arm's run among its s = 10 runs it would wait, and every rate after it)
    assert choose(rows) == {**before, "lr_engaged_post": 1e-3}
    # one (rate, seed) run missing: the rate waits, nothing else does
    assert choose(rows[:-1]) == before


def test_a_chosen_value_never_moves():
    everything = {r: 5.0 for r in [*SUITE, "bbc_news"]}
    chosen = evaluate(RULES, pd.DataFrame(pilot(everything, {**everything, "cs_boolq": 14.0})), {"head": "cls"},
                      "data")[0]
    assert chosen["head"] == "cls"  # the data now say mean; the file said cls first


def test_fill_waits_drops_and_fills():
    assert fill("regime.train.lr=@lr_lora", {"lr_lora": 0.001}) == "regime.train.lr=0.001"
    assert fill("adapter.pre_scale=@engaged_pre_scale", {"engaged_pre_scale": None}) is None
    with pytest.raises(Waiting):
        fill("backbone.pooling=@head", {})
    assert fill("regime=cs_piqa", {}) == "regime=cs_piqa" and fill("regime=cs_piqa", None) == "regime=cs_piqa"
    # a grid without selection rules (round 1, explore2) cannot fill a placeholder: an error, not a literal "@y"
    with pytest.raises(ReproduceError, match=r"@y.*no selection rules"):
        fill("x=@y", None)


def test_the_exploratory_grid_names_its_values():
    """explore2 has no selection rules, so every value in it is written out (a placeholder there is an error)."""
    cells = reproduction_plan(grid="explore2")
    assert cells and not any("@" in o for _, c in cells for o in c.overrides)


def test_the_round2_grid_waits_for_its_choices_then_fills_them():
    waiting = []
    cells = reproduction_plan(grid="reproduction2", chosen={}, waiting=waiting)
    # nothing chosen: the pilot (9 tasks x 2 heads) and SmolLM2 LoRA's rate selection run; the rest wait
    assert sum(step["claim"] == "pilot" for step, _ in cells) == 18
    assert {step["claim"] for step, _ in cells} == {"pilot", "select"}
    select = [c for step, c in cells if step["claim"] == "select"]
    assert len(select) == 3 and all("backbone=smollm2_135m" in c.overrides and "adapter=lora" in c.overrides
                                    and "regime.protocols=[]" in c.overrides for c in select)
    assert any("waits for task_a" in w for w in waiting) and any("waits for smollm2_primary" in w for w in waiting)
    assert any("waits for primary_pre_scale" in w for w in waiting)

    chosen = {"head": "mean", "task_a": "cs_piqa", "task_b": "cs_social_i_qa", "smollm2_primary": False,
              "engaged_pre_scale": None, "primary_pre_scale": 1.0, "lr_lora": 0.001, "lr_centred": 0.0003,
              "lr_engaged": None, "lr_primary": 0.0003, "lr_smollm2_lora": 0.001, "lr_smollm2_primary": 0.003}
    waiting = []
    cells = reproduction_plan(grid="reproduction2", chosen=chosen, waiting=waiting)
    assert set(waiting) == {"claim A: waits for lr_engaged_post"}  # its ten test cells
    post = [c for step, c in cells if step["claim"] == "A"]  # Addendum A's selection: 3 rates x seeds 1, 2 on task_a
    assert len(post) == 6 and all({"adapter.pre_scale=10.0", "adapter.post_scale=0.1", "regime=cs_piqa",
                                   "backbone.pooling=mean"} <= set(c.overrides) for c in post)
    chosen["lr_engaged_post"] = 0.003
    waiting = []
    cells = reproduction_plan(grid="reproduction2", chosen=chosen, waiting=waiting)
    assert waiting == []
    post = [c for step, c in cells if step["claim"] == "A" and "regime.train.lr=0.003" in c.overrides]
    assert sorted(c.seed for c in post) == [1, 2, *range(101, 111)]  # its rate's selection cells, then the test seeds
    assert not any("@" in o for _, c in cells for o in c.overrides)
    select = [c for step, c in cells if step["claim"] == "select" and "backbone=minilm_l6" in c.overrides]
    # no engaged arm: LoRA and centred, 3 rates, seeds 1 and 2 on task_a
    assert len(select) == 2 * 3 * 2 and all("regime=cs_piqa" in c.overrides for c in select)
    claim1 = [c for step, c in cells if step["claim"] == "1" and "backbone=minilm_l6" in c.overrides]
    assert all("backbone.pooling=mean" in c.overrides for c in claim1)
    lora_t1 = [c for c in claim1 if "adapter=lora" in c.overrides and "regime=cs_piqa" in c.overrides]
    assert len(lora_t1) == 10 and all("regime.train.lr=0.001" in c.overrides for c in lora_t1)
    smollm2 = [c for step, c in cells if "backbone=smollm2_135m" in c.overrides and step["claim"] == "1"]
    assert len(smollm2) == 2 * 5  # not primary: 5 seeds per arm, each at its own selected rate
    assert all("regime.train.lr=0.003" in c.overrides for c in smollm2 if "adapter=lrlora" in c.overrides)
    primary = {" ".join(c.overrides) for step, c in reproduction_plan(grid="reproduction2",
                                                                      chosen={**chosen, "smollm2_primary": True})
               if "backbone=smollm2_135m" in c.overrides and step["claim"] == "1"}
    assert len(primary) == 2 * 10


def test_the_selection_block_shows_the_evidence_and_the_file_s_values(monkeypatch):
    from analysis.registry import build

    evidence = {"head": [{"head": "cls", "collapsed": 1, "mean excess over chance": 4.2}],
                "tasks": [], "engaged_pre_scale": [], "lr": []}
    monkeypatch.setattr(selection, "update", lambda rules, write=True: ({"head": "cls"}, evidence))
    table = build("selection2", df=pd.DataFrame(), write=False)
    assert table.rows[0] == ["head", "head cls", "collapsed 1; mean excess over chance 4.2"]
    assert table.rows[1] == ["tasks", "—", "waiting for its runs"]
    assert "head = cls" in table.notes[0] and table.notes[1].startswith("Not chosen yet: task_a, task_b")


def test_smollm2_rates_are_chosen_on_validation_loss_lower_is_better():
    rows = []
    for arm, losses in (("lora", {3e-4: 1.30, 1e-3: 1.20, 3e-3: 1.25}), ("primary", {3e-4: 1.30, 1e-3: 1.205, 3e-3: 1.20})):
        for lr, loss in losses.items():
            row = run("commonsense_15k", 100 * loss, adapter="lora" if arm == "lora" else "lrlora", lr=lr,
                      pre_scale=30.0, pooling=None)
            rows.append({**row, "r": 8, "backbone": "smollm2_135m"})
    spec = RULES["select"]["lr_smollm2"]
    value, evidence = selection._lr_loss(spec, pd.DataFrame(rows), {"primary_pre_scale": 30.0}, {"rules": RULES})
    # LoRA: 1e-3 lowest; primary: 3e-3 lowest but 1e-3 within 0.01 nats, so the smaller
    assert value == {"lr_smollm2_lora": 1e-3, "lr_smollm2_primary": 1e-3} and len(evidence) == 6
    assert evidence[1] == {"arm": "lora", "lr": 1e-3, "best val loss, mean over seeds": 1.2}  # a loss, said so
    assert selection._lr_loss(spec, pd.DataFrame(rows[:-1]), {"primary_pre_scale": 30.0}, {"rules": RULES})[0] is selection.WAIT


def test_no_passing_task_drops_the_minilm_arms_and_leaves_the_centred_arm_primary():
    chosen = choose(pilot({}, {}))  # every task at chance, the fill-in too
    assert (chosen["task_a"], chosen["task_b"], chosen["smollm2_primary"]) == (None, None, True)
    assert chosen["engaged_pre_scale"] is None and chosen["primary_pre_scale"] == 1.0
    assert chosen["lr_lora"] is None and chosen["lr_primary"] is None
