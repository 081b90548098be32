# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Ablations: Tables 3, 12, 13, 20, 23
#
# Runs come from the sweeps in `conf/sweep/table*.yaml` (`make reproduce TABLE=table3 SCALE=smoke`); the
# tables select them by their settings (the DataFrame's `variant` column), through `analysis/` only.

# %%
import os

from IPython.display import Markdown, display

from analysis import build, load_results

RESULTS = os.environ.get("LRLORA_RESULTS", "outputs/results").split(os.pathsep)
OUT = os.environ.get("LRLORA_ANALYSIS_OUT", "outputs/analysis")
df = load_results(RESULTS)

# %%
for name in ("table3", "table12", "table13", "table20", "table23"):
    display(Markdown(build(name, df=df, out=OUT).markdown()))

# %% [markdown]
# Which ablation variants exist, and how many seeds each:

# %%
df[df["variant"] != ""].groupby(["column", "variant"]).size() if len(df) else df
