# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Efficiency and compression: Table 24 and PARA
#
# Table 24 from the runs' own timing and memory; PARA from the results files that `scripts/para_bbc.py`
# writes (`benchmarks/results/para_bbc/`), through `analysis/` only.

# %%
import os

from IPython.display import Markdown, display

from analysis import build, load_results

RESULTS = os.environ.get("LRLORA_RESULTS", "outputs/results").split(os.pathsep)
OUT = os.environ.get("LRLORA_ANALYSIS_OUT", "outputs/analysis")
PARA = os.environ.get("LRLORA_PARA_RESULTS", "benchmarks/results/para_bbc")

# %%
display(Markdown(build("table24", df=load_results(RESULTS), out=OUT).markdown()))

# %%
display(Markdown(build("para", results=[PARA], out=OUT).markdown()))
