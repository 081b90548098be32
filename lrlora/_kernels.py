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

// --- The same passes writing into the caller's buffers (the fused layer's workspace: no fresh pages per call).
void interp_into(torch::Tensor t, torch::Tensor tab, double lo, double inv, torch::Tensor out) {
  TORCH_CHECK(t.is_contiguous() && out.is_contiguous() && out.scalar_type() == t.scalar_type() &&
              out.numel() == t.numel() && tab.scalar_type() == torch::kFloat64);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "interp_into", [&] {
    if (tab.numel() <= kFloatPositionsUpTo && t.scalar_type() == torch::kFloat32)
      interp_impl<scalar_t, float>(t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), t.numel(),
                                   tab.data_ptr<double>(), tab.numel(), lo, inv);
    else
      interp_impl<scalar_t, double>(t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), t.numel(),
                                    tab.data_ptr<double>(), tab.numel(), lo, inv);
  });
}

// grad_t: the output buffer (or undefined: not wanted); returns the histogram (or an undefined tensor).
torch::Tensor interp_backward_into(torch::Tensor t, torch::Tensor g, torch::Tensor tab, torch::Tensor dtab, double lo,
                                   double inv, std::optional<torch::Tensor> grad_t, bool val_into_g, bool want_hist) {
  TORCH_CHECK(t.is_contiguous() && g.is_contiguous() && g.scalar_type() == t.scalar_type());
  TORCH_CHECK(tab.scalar_type() == torch::kFloat64 && dtab.scalar_type() == torch::kFloat64);
  const bool want_grad_t = grad_t.has_value() && grad_t->defined();
  if (want_grad_t)
    TORCH_CHECK(grad_t->is_contiguous() && grad_t->scalar_type() == t.scalar_type() && grad_t->numel() == t.numel());
  int64_t m = tab.numel();
  auto hist = want_hist ? torch::zeros({m}, tab.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "interp_backward_into", [&] {
    auto run = [&](auto p) {
      using P = decltype(p);
      backward_impl<scalar_t, P>(t.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), t.numel(),
                                 tab.data_ptr<double>(), dtab.data_ptr<double>(), m, lo, inv,
                                 want_grad_t ? grad_t->data_ptr<scalar_t>() : nullptr,
                                 val_into_g ? g.data_ptr<scalar_t>() : nullptr,
                                 want_hist ? hist.data_ptr<double>() : nullptr);
    };
    if (m <= kFloatPositionsUpTo && t.scalar_type() == torch::kFloat32)
      run(float(0));
    else
      run(double(0));
  });
  return hist;
}

namespace {

// In place over x (rows × cols): d = (x − c)·p; x ← d; out ← base + s·d when wanted. The operations of the
// PyTorch form (sub_, mul_, then mul_ and add_ for the merged weight) in its order, in T, in one pass.
template <typename T>
void finish_impl(T* __restrict x, const T* __restrict base, T* __restrict out, int64_t n, T c, T p, T s) {
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    if (out) {
      for (int64_t k = b; k < e; ++k) {
        T d = (x[k] - c) * p;
        x[k] = d;
        out[k] = base[k] + d * s;
      }
    } else {
      for (int64_t k = b; k < e; ++k) x[k] = (x[k] - c) * p;
    }
  });
}

// The dropped entries of x (N × d_in) as ascending flat positions: row n's are [first(n·d_in), first((n+1)·d_in)).
int64_t first_at_or_after(const int64_t* pos, int64_t nnz, int64_t flat) {
  return std::lower_bound(pos, pos + nnz, flat) - pos;
}

constexpr int64_t kLanes = 64;  // one register block of a d_out-long row (four 512-bit or eight 256-bit registers)

// y[n, c0:c0+W] += alpha · Σ_{(n, i) dropped} x[n, i] · dt[i, c0:c0+W], the sum held in registers.
template <typename T, int64_t W>
inline void row_block_axpy(T* __restrict yr, const T* __restrict x, const T* __restrict dt, const int64_t* pos,
                           int64_t e0, int64_t e1, int64_t n, int64_t d_in, int64_t d_out, int64_t c0, int64_t w,
                           T alpha) {
  T acc[W] = {};
  for (int64_t e = e0; e < e1; ++e) {
    const T a = x[pos[e]];
    const T* __restrict dr = dt + (pos[e] - n * d_in) * d_out + c0;
    if (w == W) {
#pragma omp simd
      for (int64_t k = 0; k < W; ++k) acc[k] += a * dr[k];
    } else {
      for (int64_t k = 0; k < w; ++k) acc[k] += a * dr[k];
    }
  }
  for (int64_t k = 0; k < w; ++k) yr[c0 + k] += alpha * acc[k];
}

// y[n, :] += alpha · Σ x[n, i] · dt[i, :] over the dropped (n, i): the forward's − s · D ΔWᵀ. Column blocks
// outermost, so one block of ΔWᵀ (d_in × 64) serves every row from L1/L2.
template <typename T>
void drop_forward_impl(T* y, const T* x, const T* dt, const int64_t* pos, int64_t nnz, int64_t n_rows, int64_t d_in,
                       int64_t d_out, T alpha) {
  at::parallel_for(0, n_rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> starts(r1 - r0 + 1);
    for (int64_t n = r0; n <= r1; ++n) starts[n - r0] = first_at_or_after(pos, nnz, n * d_in);
    for (int64_t c0 = 0; c0 < d_out; c0 += kLanes) {
      const int64_t w = std::min(kLanes, d_out - c0);
      for (int64_t n = r0; n < r1; ++n) {
        const int64_t e0 = starts[n - r0], e1 = starts[n - r0 + 1];
        if (e0 == e1) continue;
        row_block_axpy<T, kLanes>(y + n * d_out, x, dt, pos, e0, e1, n, d_in, d_out, c0, w, alpha);
      }
    }
  });
}

// gx[n, i] += alpha · g[n, :] · dt[i, :] over the dropped (n, i): the input gradient's − s · (1 − m) ⊙ (g ΔW).
template <typename T>
void drop_grad_input_impl(T* gx, const T* g, const T* dt, const int64_t* pos, int64_t nnz, int64_t d_in,
                          int64_t d_out, T alpha) {
  at::parallel_for(0, nnz, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t n = pos[e] / d_in, i = pos[e] - n * d_in;
      const T* __restrict gr = g + n * d_out;
      const T* __restrict dr = dt + i * d_out;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < d_out; ++k) s += gr[k] * dr[k];
      gx[pos[e]] += alpha * s;
    }
  });
}

void check_drop(const torch::Tensor& pos, std::initializer_list<torch::Tensor> ts) {
  TORCH_CHECK(pos.scalar_type() == torch::kInt64 && pos.is_contiguous() && pos.dim() == 1);
  for (auto& t : ts) TORCH_CHECK(t.is_contiguous() && t.scalar_type() == ts.begin()->scalar_type());
}

}  // namespace

// out: the merged weight base + s·ΔW (or undefined: ΔW only, in place over x).
void finish_delta(torch::Tensor x, std::optional<torch::Tensor> base, std::optional<torch::Tensor> out, double c,
                  double p, double s) {
  TORCH_CHECK(x.is_contiguous());
  const bool has_out = out.has_value() && out->defined();
  if (has_out) {
    TORCH_CHECK(base.has_value() && base->defined() && base->is_contiguous() && out->is_contiguous());
    TORCH_CHECK(base->scalar_type() == x.scalar_type() && out->scalar_type() == x.scalar_type());
    TORCH_CHECK(base->numel() == x.numel() && out->numel() == x.numel());
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "finish_delta", [&] {
    finish_impl<scalar_t>(x.data_ptr<scalar_t>(), has_out ? base->data_ptr<scalar_t>() : nullptr,
                          has_out ? out->data_ptr<scalar_t>() : nullptr, x.numel(), (scalar_t)c, (scalar_t)p,
                          (scalar_t)s);
  });
}

void drop_forward(torch::Tensor y, torch::Tensor x, torch::Tensor dt, torch::Tensor pos, double alpha) {
  check_drop(pos, {y, x, dt});
  const int64_t d_in = dt.size(0), d_out = dt.size(1);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "drop_forward", [&] {
    drop_forward_impl<scalar_t>(y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(),
                                pos.data_ptr<int64_t>(), pos.numel(), x.numel() / d_in, d_in, d_out, (scalar_t)alpha);
  });
}

void drop_grad_input(torch::Tensor gx, torch::Tensor g, torch::Tensor dt, torch::Tensor pos, double alpha) {
  check_drop(pos, {gx, g, dt});
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "drop_grad_input", [&] {
    drop_grad_input_impl<scalar_t>(gx.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(),
                                   pos.data_ptr<int64_t>(), pos.numel(), dt.size(0), dt.size(1), (scalar_t)alpha);
  });
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

        name = f"lrlora_sigma_kernels_v12_{_cpu_tag()}"
        _say_if_compiling(name)
        _module = load_inline(
            name=name,
            cpp_sources=_SOURCE,
            functions=["interp", "interp_backward", "interp_into", "interp_backward_into", "finish_delta",
                       "drop_forward", "drop_grad_input"],
            extra_cflags=["-O3", "-fopenmp", "-march=native", "-fno-trapping-math", "-mprefer-vector-width=256"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, no headers: the PyTorch path is the same math
        warnings.warn(f"lrlora: fused σ kernels unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      "using the pure-PyTorch table path", stacklevel=2)
        _module = None
    return _module
