"""The training harness: `python -m experiments.train [overrides]` (see conf/train.yaml) and `make demo`.

train.py (entry: backbone -> adapter -> data -> loop -> evaluation -> results file), backbones.py, data.py,
loop.py, evaluation.py, results.py, tracking.py, demo.py.
"""

from experiments import naming as _naming  # noqa: E402,F401  registers the ${run_suffix:} resolver of conf/train.yaml
