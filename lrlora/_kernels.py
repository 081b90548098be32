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
#ifdef __linux__
#include <sys/mman.h>
#endif

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
void backward_impl(const T* t, const T* g, int64_t n, const double* tab_d, const double* dtab_d,
                   int64_t m, double lo_d, double inv_d, T* grad_t, T* val, double* __restrict hist) {
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
    T tb[kBlock];
    for (int64_t b0 = b; b0 < e; b0 += kBlock) {
      const int64_t len = std::min(kBlock, e - b0);
      // grad_t written over t (the caller's buffer, to hold one matrix less): the loops read a copy of the block
      const T* tk = t + b0;
      if (grad_t == t) {
        std::copy(tk, tk + len, tb);
        tk = tb;
      }
      // Vectorised: positions, σ', σ, and the histogram's cells and weights into block buffers.
      if (grad_t && !val)
        backward_loop_grad<T, P>(tk, g + b0, len, dtab, dslope, last, top, lo, inv, grad_t + b0, jb, gb, gfb);
      else
        backward_loop<T, P>(tk, g + b0, len, tab, slope, dtab, dslope, last, top, lo, inv,
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

// A fresh output of many MB is a fresh mapping whose 4 kB pages fault in one by one on first touch (measured:
// ~15-25 ms for 17 MB here, more than the pass that fills it). Asking for transparent huge pages on its 2 MB-
// aligned interior (where the system gives them only on request) cuts the faults 512-fold. A hint: ignored where
// unsupported.
torch::Tensor fresh_like(const torch::Tensor& t) {
  auto out = torch::empty_like(t);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t a = (p + huge - 1) & ~(huge - 1), e = (p + out.nbytes()) & ~(huge - 1);
  if (out.nbytes() >= (size_t(8) << 20) && e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#endif
  return out;
}

}  // namespace

// --- The passes, writing into the caller's buffers (the fused layer's workspace: no fresh pages per call).
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

// --- The same passes into fresh tensors (the σ op's own path, ops.py).
torch::Tensor interp(torch::Tensor t, torch::Tensor tab, double lo, double inv) {
  auto out = fresh_like(t);
  interp_into(t, tab, lo, inv, out);
  return out;
}

// val_into_g: write σ(t) over g (the caller's own buffer) in the same pass, saving a matrix.
std::vector<torch::Tensor> interp_backward(torch::Tensor t, torch::Tensor g, torch::Tensor tab,
                                           torch::Tensor dtab, double lo, double inv, bool want_grad_t,
                                           bool val_into_g, bool want_hist) {
  auto grad_t = want_grad_t ? fresh_like(t) : torch::Tensor();
  auto hist = interp_backward_into(t, g, tab, dtab, lo, inv, grad_t, val_into_g, want_hist);
  return {grad_t, val_into_g ? g : torch::Tensor(), hist};
}

namespace {

// In place over x (rows × cols): d = (x − c)·p; x ← d; out ← base + s·d when wanted. The operations of the
// PyTorch form (sub_, mul_, then mul_ and add_ for the merged weight) in its order, in T, in one pass.
template <typename T>
void finish_in_place(T* x, const T* __restrict base, int64_t b, int64_t e, T c, T p, T s) {
  for (int64_t k = b; k < e; ++k) x[k] = base[k] + ((x[k] - c) * p) * s;
}

template <typename T>
void finish_impl(T* x, const T* __restrict base, T* out, int64_t n, T c, T p, T s) {
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    if (out == x) {  // the merged weight over ΔW itself
      finish_in_place<T>(x, base, b, e, c, p, s);
    } else if (out) {
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

// Vectors of 32 bytes (8 floats, 4 doubles) by GCC's vector extension: the compiler keeps named ones in registers,
// which it does not do for an array of accumulators.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(T);
  static inline type load(const T* p) { type v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
  static inline void store(T* p, type v) { __builtin_memcpy(p, &v, sizeof(v)); }
};

// Each dropped entry's column (i = pos − n·d_in) and the start of each row's entries, rows [r0, r1): no division.
void row_columns(const int64_t* pos, int64_t nnz, int64_t r0, int64_t r1, int64_t d_in, std::vector<int64_t>& starts,
                 std::vector<int32_t>& cols) {
  starts.assign(r1 - r0 + 1, 0);
  int64_t e = first_at_or_after(pos, nnz, r0 * d_in);
  const int64_t e0 = e;
  cols.resize(first_at_or_after(pos, nnz, r1 * d_in) - e0);
  for (int64_t n = r0; n < r1; ++n) {
    starts[n - r0] = e - e0;
    for (; e < nnz && pos[e] < (n + 1) * d_in; ++e) cols[e - e0] = (int32_t)(pos[e] - n * d_in);
  }
  starts[r1 - r0] = e - e0;
}

// y[n, :] += alpha · Σ x[n, i] · dt[i, :] over the dropped (n, i): the forward's − s · D ΔWᵀ. Column blocks of
// eight vectors outermost (one block of ΔWᵀ, d_in × 64 floats, serves every row from L2), the block's sums in
// registers over a row's entries, the rows of the entries ahead prefetched.
template <typename T>
void drop_forward_impl(T* y, const T* x, const T* dt, const int64_t* pos, int64_t nnz, int64_t n_rows, int64_t d_in,
                       int64_t d_out, T alpha) {
  using V = Vec<T>;
  using v = typename V::type;
  constexpr int64_t L = V::lanes, B = 8 * V::lanes, ahead = 8;
  at::parallel_for(0, n_rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> starts;
    std::vector<int32_t> cols;
    row_columns(pos, nnz, r0, r1, d_in, starts, cols);
    const int64_t e_base = first_at_or_after(pos, nnz, r0 * d_in), n_e = (int64_t)cols.size();
    std::vector<T> vals(n_e);
    for (int64_t e = 0; e < n_e; ++e) vals[e] = x[pos[e_base + e]];
    int64_t c0 = 0;
    for (; c0 + B <= d_out; c0 += B) {
      for (int64_t n = r0; n < r1; ++n) {
        v a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};
        for (int64_t e = starts[n - r0]; e < starts[n - r0 + 1]; ++e) {
          if (e + ahead < n_e) {
            const T* pf = dt + (int64_t)cols[e + ahead] * d_out + c0;
            for (int64_t q = 0; q < B; q += 64 / (int64_t)sizeof(T)) __builtin_prefetch(pf + q);
          }
          const T a = vals[e];
          const T* dr = dt + (int64_t)cols[e] * d_out + c0;
          a0 += a * V::load(dr);         a1 += a * V::load(dr + L);     a2 += a * V::load(dr + 2 * L);
          a3 += a * V::load(dr + 3 * L); a4 += a * V::load(dr + 4 * L); a5 += a * V::load(dr + 5 * L);
          a6 += a * V::load(dr + 6 * L); a7 += a * V::load(dr + 7 * L);
        }
        T* yr = y + n * d_out + c0;
        V::store(yr, V::load(yr) + alpha * a0);                 V::store(yr + L, V::load(yr + L) + alpha * a1);
        V::store(yr + 2 * L, V::load(yr + 2 * L) + alpha * a2); V::store(yr + 3 * L, V::load(yr + 3 * L) + alpha * a3);
        V::store(yr + 4 * L, V::load(yr + 4 * L) + alpha * a4); V::store(yr + 5 * L, V::load(yr + 5 * L) + alpha * a5);
        V::store(yr + 6 * L, V::load(yr + 6 * L) + alpha * a6); V::store(yr + 7 * L, V::load(yr + 7 * L) + alpha * a7);
      }
    }
    if (c0 < d_out) {  // the last columns, fewer than a block
      for (int64_t n = r0; n < r1; ++n) {
        T* yr = y + n * d_out;
        for (int64_t e = starts[n - r0]; e < starts[n - r0 + 1]; ++e) {
          const T a = alpha * vals[e];
          const T* dr = dt + (int64_t)cols[e] * d_out;
          for (int64_t k = c0; k < d_out; ++k) yr[k] += a * dr[k];
        }
      }
    }
  });
}

// gx[n, i] += alpha · g[n, :] · dt[i, :] over the dropped (n, i): the input gradient's − s · (1 − m) ⊙ (g ΔW).
// Four vector sums per dot, the next entry's row of ΔWᵀ prefetched.
template <typename T>
void drop_grad_input_impl(T* gx, const T* g, const T* dt, const int64_t* pos, int64_t nnz, int64_t d_in,
                          int64_t d_out, T alpha) {
  using V = Vec<T>;
  using v = typename V::type;
  constexpr int64_t L = V::lanes;
  const int64_t n_rows = nnz ? pos[nnz - 1] / d_in + 1 : 0;
  at::parallel_for(0, n_rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> starts;
    std::vector<int32_t> cols;
    row_columns(pos, nnz, r0, r1, d_in, starts, cols);
    const int64_t e_base = first_at_or_after(pos, nnz, r0 * d_in), n_e = (int64_t)cols.size();
    for (int64_t n = r0; n < r1; ++n) {
      const T* gr = g + n * d_out;
      for (int64_t e = starts[n - r0]; e < starts[n - r0 + 1]; ++e) {
        if (e + 2 < n_e) {
          const T* pf = dt + (int64_t)cols[e + 2] * d_out;
          for (int64_t q = 0; q < d_out; q += 64 / (int64_t)sizeof(T)) __builtin_prefetch(pf + q);
        }
        const T* dr = dt + (int64_t)cols[e] * d_out;
        v s0 = {}, s1 = {}, s2 = {}, s3 = {};
        int64_t k = 0;
        for (; k + 4 * L <= d_out; k += 4 * L) {
          s0 += V::load(gr + k) * V::load(dr + k);
          s1 += V::load(gr + k + L) * V::load(dr + k + L);
          s2 += V::load(gr + k + 2 * L) * V::load(dr + k + 2 * L);
          s3 += V::load(gr + k + 3 * L) * V::load(dr + k + 3 * L);
        }
        v sv = (s0 + s1) + (s2 + s3);
        T sum = 0;
        for (int64_t j = 0; j < L; ++j) sum += sv[j];
        for (; k < d_out; ++k) sum += gr[k] * dr[k];
        gx[pos[e_base + e]] += alpha * sum;
      }
    }
  });
}

void check_drop(const torch::Tensor& pos, std::initializer_list<torch::Tensor> ts) {
  TORCH_CHECK(pos.scalar_type() == torch::kInt64 && pos.is_contiguous() && pos.dim() == 1);
  for (auto& t : ts) TORCH_CHECK(t.is_contiguous() && t.scalar_type() == ts.begin()->scalar_type());
}

}  // namespace

namespace {

// The sinc basis φ(u) = sin(πu)/(πu) at u = w_k (s_m − x_k), for the nodes s_m of a uniform table, in blocks of
// kSincBlock nodes: sin and cos at a block's first node directly, then by rotation (angle addition) node to node,
// so a table costs ~2·K·M/kSincBlock sin/cos evaluations instead of 2·K·M. Per node, one pass over k (vectorised:
// one division, both forms computed and the Taylor form chosen where |u| < 1e-4, as lrlora.ops._basis_terms).
constexpr int64_t kSincBlock = 32;

struct SincBlock {
  std::vector<double> sn, cs, sd, cd, phi, du;
  explicit SincBlock(int64_t K) : sn(K), cs(K), sd(K), cd(K), phi(K), du(K) {}

  // sin/cos of π w_k (s_b − x_k) and the rotation by π w_k h for the block starting at node b (h its spacing)
  void start(const double* s, int64_t b, int64_t e, const double* w, const double* x, int64_t K) {
    const double h = e - b > 1 ? (s[e - 1] - s[b]) / double(e - 1 - b) : 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const double th = M_PI * w[k] * (s[b] - x[k]);
      sn[k] = std::sin(th);
      cs[k] = std::cos(th);
      sd[k] = std::sin(M_PI * w[k] * h);
      cd[k] = std::cos(M_PI * w[k] * h);
    }
  }

  // φ and dφ/du at node value sm for every k, then rotate to the next node
  void eval_and_step(double sm, const double* w, const double* x, int64_t K) {
    double* __restrict ph = phi.data();
    double* __restrict d = du.data();
    double* __restrict sp = sn.data();
    double* __restrict cp = cs.data();
    const double* __restrict sdp = sd.data();
    const double* __restrict cdp = cd.data();
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      const double u = w[k] * (sm - x[k]);
      const double pu = M_PI * u;
      const bool small = std::abs(u) < 1e-4;
      const double r = 1.0 / (small ? 1.0 : u);
      const double big_phi = sp[k] * r * (1.0 / M_PI);
      const double big_du = (cp[k] - big_phi) * r;
      ph[k] = small ? 1.0 - pu * pu * (1.0 / 6.0) : big_phi;
      d[k] = small ? -(M_PI * M_PI) / 3.0 * u * (1.0 - 0.1 * pu * pu) : big_du;
      const double sn1 = sp[k] * cdp[k] + cp[k] * sdp[k];
      cp[k] = cp[k] * cdp[k] - sp[k] * sdp[k];
      sp[k] = sn1;
    }
  }
};

}  // namespace

// σ(s_m) = Σ_k a_k φ(u_mk) and, when wanted, σ'(s_m) = Σ_k a_k w_k φ'(u_mk): the sinc table in float64.
std::vector<torch::Tensor> sinc_table(torch::Tensor s, torch::Tensor a, torch::Tensor w, torch::Tensor x, bool want_d) {
  for (auto* t : {&s, &a, &w, &x}) TORCH_CHECK(t->is_contiguous() && t->scalar_type() == torch::kFloat64);
  const int64_t M = s.numel(), K = a.numel();
  auto vals = torch::empty({M}, s.options());
  auto dvals = want_d ? torch::empty({M}, s.options()) : torch::Tensor();
  const double *sp = s.data_ptr<double>(), *ap = a.data_ptr<double>(), *wp = w.data_ptr<double>(), *xp = x.data_ptr<double>();
  double* vp = vals.data_ptr<double>();
  double* dp = want_d ? dvals.data_ptr<double>() : nullptr;
  std::vector<double> aw(K);
  for (int64_t k = 0; k < K; ++k) aw[k] = ap[k] * wp[k];
  const double* awp = aw.data();
  at::parallel_for(0, (M + kSincBlock - 1) / kSincBlock, 8, [&](int64_t b0, int64_t b1) {
    SincBlock blk(K);
    for (int64_t b = b0 * kSincBlock; b < std::min(M, b1 * kSincBlock); b += kSincBlock) {
      const int64_t e = std::min(M, b + kSincBlock);
      blk.start(sp, b, e, wp, xp, K);
      for (int64_t m = b; m < e; ++m) {
        blk.eval_and_step(sp[m], wp, xp, K);
        const double* __restrict ph = blk.phi.data();
        const double* __restrict du = blk.du.data();
        double v = 0.0, dv = 0.0;
#pragma omp simd reduction(+ : v, dv)
        for (int64_t k = 0; k < K; ++k) {
          v += ap[k] * ph[k];
          dv += awp[k] * du[k];
        }
        vp[m] = v;
        if (dp) dp[m] = dv;
      }
    }
  });
  return {vals, dvals};
}

// For the parameter gradients of the sinc table: Σ_m h_m φ(u_mk), Σ_m h_m φ'(u_mk)(s_m − x_k), Σ_m h_m φ'(u_mk).
std::vector<torch::Tensor> sinc_param_sums(torch::Tensor s, torch::Tensor hist, torch::Tensor w, torch::Tensor x) {
  for (auto* t : {&s, &hist, &w, &x}) TORCH_CHECK(t->is_contiguous() && t->scalar_type() == torch::kFloat64);
  const int64_t M = s.numel(), K = w.numel();
  auto out = torch::zeros({3, K}, s.options());
  const double *sp = s.data_ptr<double>(), *hp = hist.data_ptr<double>(), *wp = w.data_ptr<double>(), *xp = x.data_ptr<double>();
  double* op = out.data_ptr<double>();
  std::mutex mu;
  at::parallel_for(0, (M + kSincBlock - 1) / kSincBlock, 8, [&](int64_t b0, int64_t b1) {
    SincBlock blk(K);
    std::vector<double> acc(3 * K, 0.0);
    double* __restrict g0 = acc.data();
    double* __restrict g1 = acc.data() + K;
    double* __restrict g2 = acc.data() + 2 * K;
    for (int64_t b = b0 * kSincBlock; b < std::min(M, b1 * kSincBlock); b += kSincBlock) {
      const int64_t e = std::min(M, b + kSincBlock);
      blk.start(sp, b, e, wp, xp, K);
      for (int64_t m = b; m < e; ++m) {
        blk.eval_and_step(sp[m], wp, xp, K);
        const double h = hp[m], sm = sp[m];
        const double* __restrict ph = blk.phi.data();
        const double* __restrict du = blk.du.data();
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          g0[k] += h * ph[k];
          g1[k] += h * du[k] * (sm - xp[k]);
          g2[k] += h * du[k];
        }
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t j = 0; j < 3 * K; ++j) op[j] += acc[j];
  });
  return {out};
}

// out: the merged weight base + s·ΔW (x itself: written over ΔW; undefined: ΔW only, in place over x).
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

        name = f"lrlora_sigma_kernels_v18_{_cpu_tag()}"
        _say_if_compiling(name)
        _module = load_inline(
            name=name,
            cpp_sources=_SOURCE,
            functions=["interp", "interp_backward", "interp_into", "interp_backward_into", "finish_delta",
                       "drop_forward", "drop_grad_input", "sinc_table", "sinc_param_sums"],
            extra_cflags=["-O3", "-fopenmp", "-march=native", "-fno-trapping-math", "-mprefer-vector-width=256"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, no headers: the PyTorch path is the same math
        warnings.warn(f"lrlora: fused σ kernels unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      "using the pure-PyTorch table path", stacklevel=2)
        _module = None
    return _module
