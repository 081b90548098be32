# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Commonsense reasoning: Table 1, Table 6 (per task), Table 4 (stable ranks), Figures 2 and 4
#
# Everything here goes through `analysis/` (the same code as `python -m analysis <target>`). Set
# `LRLORA_RESULTS` to the results folder(s) to read (default `outputs/results`), e.g. after
# `make reproduce-table1 SCALE=smoke`.

# %%
import os

from IPython.display import Image, Markdown, display

from analysis import build, load_results

RESULTS = os.environ.get("LRLORA_RESULTS", "outputs/results").split(os.pathsep)
OUT = os.environ.get("LRLORA_ANALYSIS_OUT", "outputs/analysis")
df = load_results(RESULTS)
print(f"{len(df)} runs; columns: {sorted(df['column'].unique()) if len(df) else []}")

# %% [markdown]
# ## Table 1: average accuracy, with the paper's numbers beside ours

# %%
display(Markdown(build("table1", df=df, out=OUT).markdown()))

# %% [markdown]
# ## Table 6: per task, with paired t-tests against LoRA (Holm–Bonferroni across tasks)

# %%
display(Markdown(build("table1_tasks", df=df, out=OUT).markdown()))

# %% [markdown]
# ## Table 4 and Figure 2: stable rank of ΔW across layers

# %%
display(Markdown(build("table4", df=df, out=OUT).markdown()))
for name in ("fig2", "fig_spectra"):
    paths = build(name, df=df, out=OUT)
    if paths:
        display(Image(str(paths[0])))

# %% [markdown]
# ## Any other cut: the DataFrame is one row per run, flattened by docs/RESULTS.md

# %%
cols = [c for c in ("method", "r", "column", "seed", "score", "variant") if c in df.columns]
df[cols].sort_values(cols[:3]).head(20) if len(df) else df
