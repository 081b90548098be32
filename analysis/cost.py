"""What a reproduction round's runs cost, from their results files alone: `cost2`, REPRODUCTION.md's block.

    python -m analysis cost2 --out outputs/analysis

A run's cost is its wall time (`timing.wall_s`, which a resumed run carries over from its earlier launches) times
its torch threads (`config.trainer.num_threads`); runs that failed or were stopped before writing a results file
are not counted, nor re-trainings that restore a PARA source's run folder (analysis.restore.restore_source), so
the sum is what the committed runs took, not what the machine spent.
"""

from __future__ import annotations

from analysis.targets import target


def cpu_hours(runs) -> float:
    """What runs cost: each results file's wall time (timing.wall_s, a resumed run's earlier time included) times
    its torch threads (config.trainer.num_threads, 1 when absent), in hours."""
    from analysis.select import get_column

    if not len(runs):
        return 0.0
    wall = get_column(runs, "timing.wall_s").astype(float).fillna(0.0)
    threads = get_column(runs, "config.trainer.num_threads").astype(float).fillna(1.0)
    return float((wall * threads).sum() / 3600)


@target("cost2", "table", "REPRODUCTION.md round 2: the CPU-hours its runs took", own_results=True, reads_para=True)
def cost2(df, ctx):
    """The second round's cost, from its results files: runs and CPU-hours by folder (pre-registered, exploratory),
    backbone and kind (training runs, PARA runs)."""
    from analysis import rulesfile
    from analysis.load import para_derived
    from analysis.render import Table
    from analysis.rulesfile import resolve
    from analysis.verdicts import exploratory_of, read_rules, results_of

    rules = read_rules(resolve(ctx.options.get("rules", rulesfile.RULES)))
    body, total, n = [], 0.0, 0
    for origin, runs in (("pre-registered", results_of(rules)), ("exploratory", exploratory_of(rules))):
        if not len(runs):
            continue
        para = para_derived(runs)
        for backbone in sorted(runs["backbone"].unique()):
            for kind, mask in (("training", ~para), ("PARA", para)):
                mine = runs[mask & (runs["backbone"] == backbone)]
                if len(mine):
                    hours = cpu_hours(mine)
                    body.append([origin, backbone, kind, str(len(mine)), f"{hours:.1f}"])
                    total, n = total + hours, n + len(mine)
    body.append(["all", "", "", str(n), f"{total:.1f}"])
    return Table("cost2", "Round 2: what its runs cost so far", ["runs from", "backbone", "kind", "runs",
                                                                   "CPU-hours"], body,
                 ["CPU-hours: each results file's wall time (`timing.wall_s`, which a resumed run carries over) times "
                  "its torch threads (one in this round), summed; a run's evaluations are included. Not counted: "
                  "runs that failed or were stopped before writing a results file, and the re-training of a PARA "
                  "source whose run folder was gone (`restore_source`; its results file stays in that folder)."])
