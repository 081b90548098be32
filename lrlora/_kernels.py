"""Fused CPU kernels for the σ op's table path, compiled on first use (torch.utils.cpp_extension.load_inline).

One pass over t per call, where the pure-PyTorch path makes a dozen (float64 positions, floor, int64
indices, two gathers, two weighted bincounts):

* ``interp(t, tab, lo, inv)``: σ(t) by linear interpolation in the float64 table ``tab``;
* ``interp_backward(t, g, tab, dtab, lo, inv, ...)``: in one pass, g·σ'(t) (interpolating ``dtab``), the
  weighted histogram h_m = Σ g·λ_m(t) (float64, private copies per thread, summed at the end) and,
  optionally, σ(t) itself written over g once read (the fused layer's backward needs both).

Positions are computed in float64 per element, as the PyTorch path does (a float32 position is off by
up to ~1e-2 of a cell on the large tables of the finer bases). Threads: ATen's pool (torch.set_num_threads).

``get()`` returns the compiled module, or None when there is no compiler/ninja, the build fails, or
``LRLORA_NO_EXTENSION=1``: callers then take the pure-PyTorch path (same results to float rounding).
The build takes ~30-60 s once and is cached by torch (``TORCH_EXTENSIONS_DIR``, default
~/.cache/torch_extensions).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

namespace {

constexpr int64_t kBlock = 1024;

// Positions in P (float when the table is small enough that a float position is within ~1e-3 of a
// cell, else double); tables as P with a precomputed slope per cell so one gather pair per element.
// Branch-free so the loops vectorise (-fno-trapping-math); clamped so t outside [lo, hi]
// extrapolates the end cells as the PyTorch path does. NaN lands in cell 0; callers restore NaN.
#define LOCATE(x, j, f)                                   \
  P pos = ((x) - lo) * inv;                               \
  pos = pos > P(0) ? pos : P(0);                          \
  pos = pos < top ? pos : top;                            \
  int j = (int)pos;                                       \
  j = j < last ? j : last;                                \
  P fr_ = pos - (P)j;                                     \
  P f = fr_ < P(1) ? fr_ : P(1);

template <typename P>
void split_table(const double* tab, int64_t m, std::vector<P>& v, std::vector<P>& s) {
  v.resize(m);
  s.resize(m);
  for (int64_t k = 0; k < m; ++k) {
    v[k] = (P)tab[k];
    s[k] = k + 1 < m ? (P)(tab[k + 1] - tab[k]) : P(0);
  }
}

// The loop as a plain function of restrict pointers (inside a lambda, captured pointers lose
// __restrict and the loop does not vectorise).
template <typename T, typename P>
void interp_loop(const T* __restrict t, T* __restrict out, int64_t n, const P* __restrict tab,
                 const P* __restrict slope, int last, P top, P lo, P inv) {
  for (int64_t i = 0; i < n; ++i) {
    P x = (P)t[i];
    LOCATE(x, j, f)
    P v = tab[j] + f * slope[j];
    out[i] = (T)(x - x == P(0) ? v : x);  // x − x ≠ 0 exactly when x is ±inf or NaN
  }
}

template <typename T, typename P>
void backward_loop(const T* __restrict t, const T* g, int64_t n, const P* __restrict tab,
                   const P* __restrict slope, const P* __restrict dtab, const P* __restrict dslope, int last,
                   P top, P lo, P inv, T* __restrict grad_t, T* val, int* __restrict jb, P* __restrict gb,
                   P* __restrict gfb) {
  for (int64_t k = 0; k < n; ++k) {
    P x = (P)t[k];
    LOCATE(x, j, f)
    P gi = (P)g[k];
    bool ok = x - x == P(0);
    if (grad_t) grad_t[k] = (T)(ok ? gi * (dtab[j] + f * dslope[j]) : x - x);
    if (val) val[k] = (T)(ok ? tab[j] + f * slope[j] : x);
    jb[k] = j;
    gb[k] = gi;
    gfb[k] = gi * f;
  }
}

// The common case (σ(t) not wanted, g·σ'(t) wanted) with every pointer restrict: with val possibly
// aliasing g the loop above may not vectorise.
template <typename T, typename P>
void backward_loop_grad(const T* __restrict t, const T* __restrict g, int64_t n, const P* __restrict dtab,
                        const P* __restrict dslope, int last, P top, P lo, P inv, T* __restrict grad_t,
                        int* __restrict jb, P* __restrict gb, P* __restrict gfb) {
  for (int64_t k = 0; k < n; ++k) {
    P x = (P)t[k];
    LOCATE(x, j, f)
    P gi = (P)g[k];
    grad_t[k] = (T)(x - x == P(0) ? gi * (dtab[j] + f * dslope[j]) : x - x);
    jb[k] = j;
    gb[k] = gi;
    gfb[k] = gi * f;
  }
}

template <typename T, typename P>
void interp_impl(const T* __restrict t, T* __restrict out, int64_t n, const double* tab_d, int64_t m,
                 double lo_d, double inv_d) {
  std::vector<P> tv, ts;
  split_table<P>(tab_d, m, tv, ts);
  const P* __restrict tab = tv.data();
  const P* __restrict slope = ts.data();
  const int last = (int)(m - 2);
  const P top = (P)(m - 1), lo = (P)lo_d, inv = (P)inv_d;
  at::parallel_for(0, n, 1 << 16, [=](int64_t b, int64_t e) {
    interp_loop<T, P>(t + b, out + b, e - b, tab, slope, last, top, lo, inv);
  });
}

// val may alias g (σ(t) written over the upstream gradient once it is read): no __restrict on either.
template <typename T, typename P>
void backward_impl(const T* __restrict t, const T* g, int64_t n, const double* tab_d, const double* dtab_d,
                   int64_t m, double lo_d, double inv_d, T* __restrict grad_t, T* val, double* __restrict hist) {
  std::vector<P> tv, ts, dv, ds;
  split_table<P>(tab_d, m, tv, ts);
  split_table<P>(dtab_d, m, dv, ds);
  const P* __restrict tab = tv.data();
  const P* __restrict slope = ts.data();
  const P* __restrict dtab = dv.data();
  const P* __restrict dslope = ds.data();
  const int last = (int)(m - 2);
  const P top = (P)(m - 1), lo = (P)lo_d, inv = (P)inv_d;
  std::mutex mu;
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    // The histogram as pairs (Σ g, Σ g·f) per cell: one 16-byte update per element; node m then gets
    // Σ_cell m (g − g·f) + Σ_cell m−1 g·f. Two private copies, alternating by element (neighbours often
    // hit the same cell, and one copy would serialise on its store-to-load dependency); summed at the end.
    std::vector<double> h(hist ? 4 * m : 0, 0.0);
    int jb[kBlock];
    P gb[kBlock], gfb[kBlock];
    for (int64_t b0 = b; b0 < e; b0 += kBlock) {
      const int64_t len = std::min(kBlock, e - b0);
      // Vectorised: positions, σ', σ, and the histogram's cells and weights into block buffers.
      if (grad_t && !val)
        backward_loop_grad<T, P>(t + b0, g + b0, len, dtab, dslope, last, top, lo, inv, grad_t + b0, jb, gb, gfb);
      else
        backward_loop<T, P>(t + b0, g + b0, len, tab, slope, dtab, dslope, last, top, lo, inv,
                            grad_t ? grad_t + b0 : nullptr, val ? val + b0 : nullptr, jb, gb, gfb);
      if (hist) {  // the scatter: scalar
        double* h0 = h.data();
        for (int64_t k = 0; k < len; ++k) {
          double* c = h0 + ((k & 1) ? 2 * m : 0) + 2 * (int64_t)jb[k];
          c[0] += (double)gb[k];
          c[1] += (double)gfb[k];
        }
      }
    }
    if (hist) {
      std::lock_guard<std::mutex> lock(mu);
      const double* h0 = h.data();
      const double* h1 = h.data() + 2 * m;
      for (int64_t k = 0; k < m; ++k) {
        hist[k] += h0[2 * k] + h1[2 * k] - h0[2 * k + 1] - h1[2 * k + 1];
        if (k > 0) hist[k] += h0[2 * k - 1] + h1[2 * k - 1];
      }
    }
  });
}

// A float position is off by up to ~6e-8 · m cells: fine (≤ 1e-3 of a cell) up to 2^14 points.
constexpr int64_t kFloatPositionsUpTo = 1 << 14;

}  // namespace

torch::Tensor interp(torch::Tensor t, torch::Tensor tab, double lo, double inv) {
  TORCH_CHECK(t.is_contiguous() && tab.is_contiguous() && tab.scalar_type() == torch::kFloat64);
  auto out = torch::empty_like(t);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "interp", [&] {
    if (tab.numel() <= kFloatPositionsUpTo && t.scalar_type() == torch::kFloat32)
      interp_impl<scalar_t, float>(t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), t.numel(),
                                   tab.data_ptr<double>(), tab.numel(), lo, inv);
    else
      interp_impl<scalar_t, double>(t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), t.numel(),
                                    tab.data_ptr<double>(), tab.numel(), lo, inv);
  });
  return out;
}

// val_into_g: write σ(t) over g (the caller's own buffer) in the same pass, saving a matrix.
std::vector<torch::Tensor> interp_backward(torch::Tensor t, torch::Tensor g, torch::Tensor tab,
                                           torch::Tensor dtab, double lo, double inv, bool want_grad_t,
                                           bool val_into_g, bool want_hist) {
  TORCH_CHECK(t.is_contiguous() && g.is_contiguous() && g.scalar_type() == t.scalar_type());
  TORCH_CHECK(tab.scalar_type() == torch::kFloat64 && dtab.scalar_type() == torch::kFloat64);
  int64_t m = tab.numel();
  auto grad_t = want_grad_t ? torch::empty_like(t) : torch::Tensor();
  auto val = val_into_g ? g : torch::Tensor();
  auto hist = want_hist ? torch::zeros({m}, tab.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "interp_backward", [&] {
    auto run = [&](auto p) {
      using P = decltype(p);
      backward_impl<scalar_t, P>(t.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), t.numel(),
                                 tab.data_ptr<double>(), dtab.data_ptr<double>(), m, lo, inv,
                                 want_grad_t ? grad_t.data_ptr<scalar_t>() : nullptr,
                                 val_into_g ? g.data_ptr<scalar_t>() : nullptr,
                                 want_hist ? hist.data_ptr<double>() : nullptr);
    };
    if (m <= kFloatPositionsUpTo && t.scalar_type() == torch::kFloat32)
      run(float(0));
    else
      run(double(0));
  });
  return {grad_t, val, hist};
}
"""

_module = None
_tried = False


def _cpu_tag() -> str:
    """Built with -march=native: one build per CPU model, so a shared cache never hands a binary to a CPU
    that lacks its instructions."""
    import hashlib
    import platform

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln for ln in f if ln.startswith(("model name", "flags"))), model)
    except OSError:
        pass
    return hashlib.sha1(model.encode()).hexdigest()[:8]


def _say_if_compiling(name: str) -> None:
    """The first build on a machine takes 30-60 s inside the first LR-LoRA step: say so, rather than stall in silence
    (stdout: a progress note, not an error)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        build = Path(_get_build_directory(name, verbose=False))
        if any(build.glob(f"{name}*.so")):
            return
    except Exception:  # a private helper of torch's: without it, say nothing
        return
    print(f"lrlora: compiling the fused σ kernels for this CPU, once (30-60 s; cached in {build})", flush=True)


def get():
    """The compiled kernels, or None (no compiler, failed build, or LRLORA_NO_EXTENSION=1)."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("LRLORA_NO_EXTENSION", "") not in ("", "0"):
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        name = f"lrlora_sigma_kernels_v10_{_cpu_tag()}"
        _say_if_compiling(name)
        _module = load_inline(
            name=name,
            cpp_sources=_SOURCE,
            functions=["interp", "interp_backward"],
            extra_cflags=["-O3", "-fopenmp", "-march=native", "-fno-trapping-math", "-mprefer-vector-width=256"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, no headers: the PyTorch path is the same math
        warnings.warn(f"lrlora: fused σ kernels unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      "using the pure-PyTorch table path", stacklevel=2)
        _module = None
    return _module
