"""Fused CPU kernels for the σ op's table path, compiled on first use (torch.utils.cpp_extension.load_inline).

One pass over t per call, where the pure-PyTorch path makes a dozen (float64 positions, floor, int64
indices, two gathers, two weighted bincounts):

* ``interp(t, tab, lo, inv)``: σ(t) by linear interpolation in the float64 table ``tab``;
* ``interp_backward(t, g, tab, dtab, lo, inv, ...)``: in one pass, g·σ'(t) (interpolating ``dtab``), the
  weighted histogram h_m = Σ g·λ_m(t) (float64, one private copy per thread, summed at the end) and,
  optionally, σ(t) itself.

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

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

namespace {

// Cell index (int32: tables hold at most 2^21 points) and fraction of element x, branch-free so the
// loops vectorise (-fno-trapping-math); clamped so t outside [lo, hi] extrapolates the end cells as
// the PyTorch path does. NaN lands in cell 0; callers restore NaN in the outputs.
#define LOCATE(x, j, f)                                   \
  double pos = ((x) - lo) * inv;                          \
  pos = pos > 0.0 ? pos : 0.0;                            \
  pos = pos < top ? pos : top;                            \
  int j = (int)pos;                                       \
  j = j < last ? j : last;                                \
  double fr_ = pos - (double)j;                           \
  double f = fr_ < 1.0 ? fr_ : 1.0;

template <typename T>
void interp_impl(const T* __restrict t, T* __restrict out, int64_t n, const double* __restrict tab, int64_t m,
                 double lo, double inv) {
  const int last = (int)(m - 2);
  const double top = (double)(m - 1);
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double x = (double)t[i];
      LOCATE(x, j, f)
      double v = tab[j] + f * (tab[j + 1] - tab[j]);
      out[i] = (T)(x - x == 0.0 ? v : x);  // x − x ≠ 0 exactly when x is ±inf or NaN
    }
  });
}

template <typename T>
void backward_impl(const T* __restrict t, const T* __restrict g, int64_t n, const double* __restrict tab,
                   const double* __restrict dtab, int64_t m, double lo, double inv, T* __restrict grad_t,
                   T* __restrict val, double* __restrict hist) {
  const int last = (int)(m - 2);
  const double top = (double)(m - 1);
  std::mutex mu;
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    // The histogram as pairs (Σ g, Σ g·f) per cell: one 16-byte update per element; node m then gets
    // Σ_cell m (g − g·f) + Σ_cell m−1 g·f. Two private copies, alternating by element (neighbours often
    // hit the same cell, and one copy would serialise on its store-to-load dependency); summed at the end.
    std::vector<double> h(hist ? 4 * m : 0, 0.0);
    for (int64_t i = b; i < e; ++i) {
      double x = (double)t[i];
      LOCATE(x, j, f)
      double gi = (double)g[i];
      bool ok = x - x == 0.0;
      if (grad_t) grad_t[i] = (T)(ok ? gi * (dtab[j] + f * (dtab[j + 1] - dtab[j])) : x - x);
      if (val) val[i] = (T)(ok ? tab[j] + f * (tab[j + 1] - tab[j]) : x);
      if (hist) {
        double* c = h.data() + ((i & 1) ? 2 * m : 0) + 2 * (int64_t)j;
        c[0] += gi;
        c[1] += gi * f;
      }
    }
    if (hist) {
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t k = 0; k < m; ++k) {
        const double* h0 = h.data();
        const double* h1 = h.data() + 2 * m;
        hist[k] += h0[2 * k] + h1[2 * k] - h0[2 * k + 1] - h1[2 * k + 1];
        if (k > 0) hist[k] += h0[2 * k - 1] + h1[2 * k - 1];
      }
    }
  });
}

}  // namespace

torch::Tensor interp(torch::Tensor t, torch::Tensor tab, double lo, double inv) {
  TORCH_CHECK(t.is_contiguous() && tab.is_contiguous() && tab.scalar_type() == torch::kFloat64);
  auto out = torch::empty_like(t);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "interp", [&] {
    interp_impl<scalar_t>(t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), t.numel(),
                          tab.data_ptr<double>(), tab.numel(), lo, inv);
  });
  return out;
}

std::vector<torch::Tensor> interp_backward(torch::Tensor t, torch::Tensor g, torch::Tensor tab,
                                           torch::Tensor dtab, double lo, double inv, bool want_grad_t,
                                           bool want_val, bool want_hist) {
  TORCH_CHECK(t.is_contiguous() && g.is_contiguous() && g.scalar_type() == t.scalar_type());
  TORCH_CHECK(tab.scalar_type() == torch::kFloat64 && dtab.scalar_type() == torch::kFloat64);
  int64_t m = tab.numel();
  auto grad_t = want_grad_t ? torch::empty_like(t) : torch::Tensor();
  auto val = want_val ? torch::empty_like(t) : torch::Tensor();
  auto hist = want_hist ? torch::zeros({m}, tab.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "interp_backward", [&] {
    backward_impl<scalar_t>(t.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), t.numel(),
                            tab.data_ptr<double>(), dtab.data_ptr<double>(), m, lo, inv,
                            want_grad_t ? grad_t.data_ptr<scalar_t>() : nullptr,
                            want_val ? val.data_ptr<scalar_t>() : nullptr,
                            want_hist ? hist.data_ptr<double>() : nullptr);
  });
  return {grad_t, val, hist};
}
"""

_module = None
_tried = False


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

        _module = load_inline(
            name="lrlora_sigma_kernels_v6",
            cpp_sources=_SOURCE,
            functions=["interp", "interp_backward"],
            extra_cflags=["-O3", "-fopenmp", "-march=native", "-fno-trapping-math", "-fno-tree-vectorize"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, no headers: the PyTorch path is the same math
        warnings.warn(f"lrlora: fused σ kernels unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      "using the pure-PyTorch table path", stacklevel=2)
        _module = None
    return _module
