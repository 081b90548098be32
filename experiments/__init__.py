"""The training harness: `python -m experiments.train [overrides]` (see conf/train.yaml) and `make demo`.

train.py (entry: backbone -> adapter -> data -> loop -> evaluation -> results file), backbones.py, data.py,
loop.py, evaluation.py, results.py, tracking.py, demo.py.
"""
