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
#include <cmath>
#include <mutex>
#include <vector>

namespace {

// Cell index and fraction of one element, branch-free so the loops vectorise; clamped so t outside
// [lo, hi] extrapolates the end cells exactly as the PyTorch path does. A non-finite t is handled by
// the caller (the fraction of NaN is NaN, which propagates).
inline int64_t locate(double x, double lo, double inv, double last, double& f) {
  double pos = (x - lo) * inv;
  pos = pos > 0.0 ? pos : 0.0;              // also maps NaN to 0 (the caller restores NaN)
  double fl = (double)(int64_t)pos;          // pos >= 0: truncation is floor
  fl = fl < last ? fl : last;
  double fr = pos - fl;
  f = fr < 1.0 ? fr : 1.0;
  return (int64_t)fl;
}

template <typename T>
void interp_impl(const T* t, T* out, int64_t n, const double* tab, int64_t m, double lo, double inv) {
  const double last = (double)(m - 2);
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double x = (double)t[i];
      double f;
      int64_t j = locate(x, lo, inv, last, f);
      double v = tab[j] + f * (tab[j + 1] - tab[j]);
      out[i] = (T)(x - x == 0.0 ? v : x);  // x − x ≠ 0 exactly when x is ±inf or NaN
    }
  });
}

template <typename T>
void backward_impl(const T* t, const T* g, int64_t n, const double* tab, const double* dtab, int64_t m,
                   double lo, double inv, T* grad_t, T* val, double* hist) {
  const double last = (double)(m - 2);
  std::mutex mu;
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    // Two private histograms, alternating by element: neighbouring elements often hit the same cell,
    // and one copy would serialise on its store-to-load dependency.
    std::vector<double> h(hist ? 2 * m : 0, 0.0);
    double* h0 = h.data();
    double* h1 = h.data() + m;
    for (int64_t i = b; i < e; ++i) {
      double x = (double)t[i];
      double f;
      int64_t j = locate(x, lo, inv, last, f);
      double gi = (double)g[i];
      if (grad_t) grad_t[i] = (T)(gi * (dtab[j] + f * (dtab[j + 1] - dtab[j])));
      if (val) val[i] = (T)(tab[j] + f * (tab[j + 1] - tab[j]));
      if (hist) {
        double* hh = (i & 1) ? h1 : h0;
        double gf = gi * f;
        hh[j] += gi - gf;
        hh[j + 1] += gf;
      }
    }
    if (hist) {
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t k = 0; k < m; ++k) hist[k] += h0[k] + h1[k];
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
            name="lrlora_sigma_kernels_v3",
            cpp_sources=_SOURCE,
            functions=["interp", "interp_backward"],
            extra_cflags=["-O3", "-fopenmp", "-march=native"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, no headers: the PyTorch path is the same math
        warnings.warn(f"lrlora: fused σ kernels unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      "using the pure-PyTorch table path", stacklevel=2)
        _module = None
    return _module
