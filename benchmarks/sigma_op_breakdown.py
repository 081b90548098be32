"""Where the σ op's time goes: its parts timed one by one in one process, next to the whole op and one
elementwise pass (down_proj shape, 896×4864, sinc, K = 50), and the two passes over t in the compiled C++
kernels (lrlora._kernels) against the same passes written in PyTorch and compiled by torch.compile.

    python -m benchmarks.sigma_op_breakdown [--spread 0.8] [--repeats 15] [--no-compile]
    MALLOC_TRIM_THRESHOLD_=1000000000 MALLOC_MMAP_THRESHOLD_=1000000000 python -m benchmarks.sigma_op_breakdown
        # the same with glibc keeping freed memory mapped: no page faults on the op's large outputs

Prints medians in ms and writes them, with each as a multiple of one elementwise pass into a buffer, to
benchmarks/results/sigma_op_breakdown.json (``--out``): the range of t
(aminmax), the table of σ (forward), the table of σ and σ' (backward), the compiled forward and backward passes
over t, the backward without its histogram, and the parameter gradients from the histogram. The torch.compile
rows run the same math (float32 positions and table, float64 histogram by index_add_) as an alternative: compared
here, not used by the library. Last, the whole op again after telling glibc to keep freed memory mapped (mallopt):
the difference is the page faults of its two fresh outputs.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info, write_json_atomic
from lrlora import TransferFunction, cli, ops, sigma
from lrlora.errors import ConfigError


def compiled_passes(tab):
    """The table's forward and backward passes in PyTorch, compiled by torch.compile (Inductor's C++ backend)."""
    m, lo, inv = tab.m, tab.lo, tab.inv

    def split(v):
        return v.float(), torch.cat([(v[1:] - v[:-1]).float(), v.new_zeros(1, dtype=torch.float32)])

    v, s = split(tab.vals)
    d, ds = split(tab.dvals)

    def locate(t):
        pos = ((t - lo) * inv).clamp(0, m - 1)
        j = pos.to(torch.int32).clamp(max=m - 2)
        return j.long().view(-1), (pos - j).clamp(max=1.0).view(-1)

    def forward(t):
        j, f = locate(t)
        return (v[j] + f * s[j]).view(t.shape)

    def backward(t, g):
        j, f = locate(t)
        gv = g.reshape(-1)
        grad_t = gv * (d[j] + f * ds[j])
        gf = (gv * f).double()
        h = torch.zeros(m, dtype=torch.float64, device=t.device)
        h.index_add_(0, j, gv.double() - gf)
        h.index_add_(0, j + 1, gf)
        return grad_t.view(t.shape), h

    return torch.compile(forward, dynamic=False), torch.compile(backward, dynamic=False)


def keep_freed_memory_mapped() -> bool:
    """glibc: serve large blocks from the heap and never trim it (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD); False
    where there is no glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, 1 << 30))  # M_MMAP_, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def main(argv=None):
    ap = cli.ArgumentParser(prog="python -m benchmarks.sigma_op_breakdown", description=__doc__.splitlines()[0])
    ap.add_argument("--spread", type=float, default=0.8, help="t ~ spread · N(0, 1)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sigma_op_breakdown.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tf = TransferFunction("sinc", K=50, L=3.0, amplitude_init="random", amplitude_init_std=0.1)
    t = (torch.randn(896, 4864) * args.spread).requires_grad_()
    g = torch.randn(896, 4864)
    td = t.detach()
    buf = torch.empty_like(td)

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
        raise ConfigError("needs the compiled kernels (a C++ compiler; LRLORA_NO_EXTENSION unset) and a finite t")
    tab.vals, tab.dvals  # noqa: B018  (build both before timing the passes that read them)
    _, hist = tab.backward(td, g, True, True)
    rows = {
        "whole op (forward + backward)": tm(step),
        "one elementwise pass (t * 2)": tm(lambda: td.mul(2.0)),
        "one elementwise pass into a buffer (torch.mul(t, 2, out=buf))": tm(lambda: torch.mul(td, 2.0, out=buf)),
        "range of t (aminmax)": tm(lambda: torch.aminmax(td)),
        "table: σ": tm(lambda: ops._table_values(tf.spec, tab.s, tf.a, tf.rho, tf.grid)),
        "table: σ and σ'": tm(lambda: ops._table_derivative(tf.spec, tab.s, tf.a, tf.rho, tf.grid)),
        "forward pass over t (interpolation)": tm(lambda: tab.interp(td)),
        "backward pass over t (g·σ' and histogram)": tm(lambda: tab.backward(td, g, True, True)),
        "backward pass over t without the histogram": tm(lambda: tab.backward(td, g, True, False)),
        "parameter gradients from the histogram": tm(lambda: tab.param_grads(hist, (True, True, False))),
    }
    # The same op once glibc keeps freed memory mapped (mallopt, as MALLOC_TRIM_THRESHOLD_ and
    # MALLOC_MMAP_THRESHOLD_ would): its two large outputs then reuse pages instead of faulting fresh ones in.
    if keep_freed_memory_mapped():
        rows["whole op, freed memory kept mapped (no page faults)"] = tm(step)
    if not args.no_compile:
        fwd, bwd = compiled_passes(tab)
        # Same values as the C++ kernels (a check that the comparison is of the same work).
        assert torch.allclose(fwd(td), tab.interp(td), atol=1e-6)
        assert torch.allclose(bwd(td, g)[1], hist, rtol=1e-6, atol=1e-9)
        rows["torch.compile: forward pass over t"] = tm(lambda: fwd(td))
        rows["torch.compile: backward pass over t (g·σ' and histogram)"] = tm(lambda: bwd(td, g))
    print(f"table points: {tab.m}, spread {args.spread}, threads {torch.get_num_threads()}")
    for k, v in rows.items():
        print(f"{k:<64} {v:8.2f} ms")
    # Ratios to the pass into a buffer: the allocating pass is bimodal here (whether its output's pages
    # fault in depends on the allocator's state), the pass into a buffer is not.
    ew = rows["one elementwise pass into a buffer (torch.mul(t, 2, out=buf))"]
    write_json_atomic({"machine": machine_info("cpu"), "threads": torch.get_num_threads(), "shape": [896, 4864],
                       "K": 50, "spread": args.spread, "table_points": tab.m, "repeats": args.repeats,
                       "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
                       "median_ms": rows, "x_elementwise": {k: v / ew for k, v in rows.items()}}, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
