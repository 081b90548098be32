"""The training harness: `python -m experiments.train [overrides]` (see conf/train.yaml) and `make demo`.

train.py (entry: prepare -> fit -> score -> record), guard.py (checks before a run starts), identity.py (which
settings change a result, and the adapter's keyword arguments), naming.py (run names), backbones.py, data.py,
loop.py, protocols/ (evaluation), results.py (the results file's schema, RunResult), tracking.py; the other entry points evaluate.py (re-score a run), para.py (PARA, on a run or a folder),
demo.py and clean.py (remove what the harness wrote); every one of them reports errors through
lrlora/cli.py, the Hydra ones by way of hydra_cli.py (docs/guarantees.md).
"""

from experiments import hydra_cli as _hydra_cli  # noqa: E402,F401  registers the phrasing of Hydra's errors (lrlora.cli)
from experiments import naming as _naming  # noqa: E402,F401  registers the ${run_suffix:} resolver of conf/train.yaml
