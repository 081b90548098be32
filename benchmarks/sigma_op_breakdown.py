"""Where the σ op's time goes: its parts timed one by one in one process, next to the whole op and one
elementwise pass (down_proj shape, 896×4864, sinc, K = 50).

    python benchmarks/sigma_op_breakdown.py [--spread 0.8] [--repeats 15]
    MALLOC_TRIM_THRESHOLD_=1000000000 MALLOC_MMAP_THRESHOLD_=1000000000 python benchmarks/sigma_op_breakdown.py
        # the same with glibc keeping freed memory mapped: no page faults on the op's large outputs

Prints medians in ms (nothing is written): the parts are the range of t (aminmax), the table of σ (forward),
the table of σ and σ' (backward), the compiled forward and backward passes over t, the backward without its
histogram, and the parameter gradients from the histogram.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lrlora import TransferFunction, ops, sigma  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spread", type=float, default=0.8, help="t ~ spread · N(0, 1)")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    tf = TransferFunction("sinc", K=50, L=3.0, amplitude_init="random", amplitude_init_std=0.1)
    t = (torch.randn(896, 4864) * args.spread).requires_grad_()
    g = torch.randn(896, 4864)
    td = t.detach()

    def tm(f):
        f()
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    def step():
        t.grad = None
        tf.zero_grad(set_to_none=True)
        sigma(t, tf, mode="table").backward(g)

    tab = ops.make_table(td, tf.spec, tf.a, tf.rho, tf.grid, 1024)
    if tab is None or ops._kernels_for(td) is None:
        sys.exit("error: needs the compiled kernels (a C++ compiler; LRLORA_NO_EXTENSION unset) and a finite t")
    tab.vals, tab.dvals  # noqa: B018  (build both before timing the passes that read them)
    _, hist = tab.backward(td, g, True, True)
    rows = {
        "whole op (forward + backward)": tm(step),
        "one elementwise pass (t * 2)": tm(lambda: td.mul(2.0)),
        "range of t (aminmax)": tm(lambda: torch.aminmax(td)),
        "table: σ": tm(lambda: ops._table_values(tf.spec, tab.s, tf.a, tf.rho, tf.grid)),
        "table: σ and σ'": tm(lambda: ops._table_derivative(tf.spec, tab.s, tf.a, tf.rho, tf.grid)),
        "forward pass over t (interpolation)": tm(lambda: tab.interp(td)),
        "backward pass over t (g·σ' and histogram)": tm(lambda: tab.backward(td, g, True, True)),
        "backward pass over t without the histogram": tm(lambda: tab.backward(td, g, True, False)),
        "parameter gradients from the histogram": tm(lambda: tab.param_grads(hist, (True, True, False))),
    }
    print(f"table points: {tab.m}, spread {args.spread}, threads {torch.get_num_threads()}")
    for k, v in rows.items():
        print(f"{k:<45} {v:8.2f} ms")


if __name__ == "__main__":
    main()
