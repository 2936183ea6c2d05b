// Exact full-vocabulary KL(softmax(z) || softmax(r)) on the CPU: one pass over both rows,
// no [N, V] temporaries, fp32 accumulation (fp64 for fp64 inputs).
//
// Forward, per row over chunks of the vocabulary, in raw logits units: running maxima
// Mz = max x, Mr = max x_ref and, with a = x - Mz, c = x_ref - Mr and 1/T = inv_t,
//   sz = Σ exp(a/T),   sr = Σ exp(c/T),   u = Σ exp(a/T)·(a - c)
// When a chunk raises the maxima by dz = Mz_old - Mz_new <= 0 (dr likewise), each earlier a
// grows by dz and each c by dr, so first
//   u <- exp(dz/T)·(u + sz·(dz - dr)),   sz <- exp(dz/T)·sz,   sr <- exp(dr/T)·sr
// With log p = a/T - log sz and log q = c/T - log sr:
//   KL = Σ p·(log p - log q) = u / (T·sz) + log sr - log sz,
//   lse_z = Mz/T + log sz,  lse_r = Mr/T + log sr
// u is relative to both maxima and a - c is taken before any scaling (exact for bf16 / fp16
// logits), so rows equal up to an exactly representable constant give KL = 0 exactly (no
// lse_z - lse_r cancellation, as the Triton and CUDA kernels). A term with p = 0 adds 0 even where q = 0; a live p where
// q = 0 makes KL = +inf; NaN anywhere in a row makes that row's outputs NaN; an all -inf
// policy row has sz = 0: NaN KL and -inf lse_z, as the reference.
//
// Backward, per element from the saved per-row kl, lse_z, lse_r:
//   dz = g·p·(log p - log q - KL) / T  (0 where p = 0; NaN where log p is),
//   dr = g·(q - p) / T  (when wanted; NaN where log p or log q is)
#include "kl.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "../row_io.h"
#include "row_common.h"

namespace rlhf_kernels {
namespace cpu {
namespace {

using namespace detail;

template <typename acc_t>
struct KlState {
  acc_t mz = neg_inf<acc_t>(), mr = neg_inf<acc_t>(), sz = 0, sr = 0, u = 0;
};

// Adds chunk (xs, rs)[0:n], measured from the raw values mz, mr, to st's sz, sr and u.
template <typename acc_t>
inline void chunk_kl_sums(const acc_t* xs, const acc_t* rs, int64_t n, acc_t inv_t, acc_t mz, acc_t mr,
                          KlState<acc_t>& st) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vmz(mz), vmr(mr), vinv(inv_t), zero(0), ninf(neg_inf<acc_t>());
  Vec vsz(0), vsr(0), vu(0);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t lanes = std::min<int64_t>(Vec::size(), n - i);
    // lanes past the tail are -inf: exp gives 0 and the select below drops their a - c
    Vec a = Vec::set(ninf, Vec::loadu(xs + i, lanes) - vmz, lanes);
    Vec c = Vec::set(ninf, Vec::loadu(rs + i, lanes) - vmr, lanes);
    Vec ez = fast_exp(a * vinv);
    vsz = vsz + ez;
    vsr = vsr + fast_exp(c * vinv);
    vu = vu + Vec::blendv(zero, ez * (a - c), ez > zero);  // p = 0 adds 0, even where q = 0
  }
  auto sum = [](Vec& x, Vec& y) { return x + y; };
  st.sz += at::vec::vec_reduce_all<acc_t>(sum, vsz);
  st.sr += at::vec::vec_reduce_all<acc_t>(sum, vsr);
  st.u += at::vec::vec_reduce_all<acc_t>(sum, vu);
}

// Raises the (raw) maxima to (cz, cr) where larger, rescaling the sums first.
template <typename acc_t>
inline void raise_maxima(KlState<acc_t>& st, acc_t cz, acc_t cr, acc_t inv_t) {
  const acc_t mz = std::max(st.mz, cz), mr = std::max(st.mr, cr);
  // From a -inf maximum the sums are 0 (policy) or u holds +inf from q = 0 terms (reference): no rescale.
  const acc_t dz = st.mz == neg_inf<acc_t>() ? neg_inf<acc_t>() : st.mz - mz;
  const acc_t dr = st.mr == neg_inf<acc_t>() ? acc_t(0) : st.mr - mr;
  if (mz != st.mz || mr != st.mr) {
    const acc_t fz = std::exp(dz * inv_t);
    // an underflowed rescale drops the old terms (a +inf u too: no 0·inf)
    st.u = fz > 0 ? fz * (st.u + st.sz * (dz - dr)) : acc_t(0);
    st.sz *= fz;
    st.sr *= std::exp(dr * inv_t);
  }
  st.mz = mz;
  st.mr = mr;
}

template <typename sx_t, typename sr_t, typename acc_t>
void forward_rows(const sx_t* logits, const sr_t* ref, int64_t rows_inner, int64_t xs_outer, int64_t xs_inner,
                  int64_t rs_outer, int64_t rs_inner, int64_t vocab, double temperature, acc_t* kl_out,
                  acc_t* lse_z_out, acc_t* lse_r_out, int64_t begin, int64_t end) {
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  alignas(64) acc_t bx[kChunk];
  alignas(64) acc_t br[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const sx_t* x = row_at(logits, row, rows_inner, xs_outer, xs_inner);
    const sr_t* r = row_at(ref, row, rows_inner, rs_outer, rs_inner);
    KlState<acc_t> st;
    // NaN in a row makes its lse (and the KL) NaN; it is tracked by flag because ATen's fast exp clamps
    // NaN to a finite value. The other row's statistics go on.
    bool nan_z = false, nan_r = false;
    for (int64_t c0 = 0; c0 < vocab && !(nan_z && nan_r); c0 += kChunk) {
      const int64_t n = std::min(kChunk, vocab - c0);
      const acc_t* xs = chunk_source(x + c0, n, bx);
      const acc_t* rs = chunk_source(r + c0, n, br);
      const acc_t cz = chunk_max(xs, n), cr = chunk_max(rs, n);
      nan_z = nan_z || std::isnan(cz);
      nan_r = nan_r || std::isnan(cr);
      raise_maxima(st, nan_z ? neg_inf<acc_t>() : cz, nan_r ? neg_inf<acc_t>() : cr, inv_t);
      // The maxima the chunk is measured from: 0 while a row has been all -inf (its terms are exp(-inf) = 0;
      // a - c = +inf where p > 0 = q), +inf for a row with NaN (finite entries add 0, the rest is discarded).
      const acc_t from_z = nan_z ? -neg_inf<acc_t>() : (st.mz == neg_inf<acc_t>() ? acc_t(0) : st.mz);
      const acc_t from_r = nan_r ? -neg_inf<acc_t>() : (st.mr == neg_inf<acc_t>() ? acc_t(0) : st.mr);
      chunk_kl_sums(xs, rs, n, inv_t, from_z, from_r, st);
    }
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    const acc_t log_sz = std::log(st.sz), log_sr = std::log(st.sr);
    // Mz/T rounds as the backward's z = x/T does at the maximum
    const acc_t lse_z = nan_z ? nan : st.mz * inv_t + log_sz;
    const acc_t lse_r = nan_r ? nan : st.mr * inv_t + log_sr;
    // one difference of the logs, so no product folds into it (rows equal up to a constant: exactly 0)
    kl_out[row] = (nan_z || nan_r) ? nan : st.u * inv_t / st.sz + (log_sr - log_sz);
    lse_z_out[row] = lse_z;
    lse_r_out[row] = lse_r;
  }
}

// dz[0:n] = gt·p·(lp - lq - kl) (0 where p = 0 or gt = 0, NaN where lp is) and, when dr, dr[0:n] = gt·(q - p)
// (NaN where lp or lq is); gt = g / T.
template <typename acc_t>
inline void chunk_kl_grad(const acc_t* xs, const acc_t* rs, int64_t n, acc_t inv_t, acc_t lse_z, acc_t lse_r,
                          acc_t kl, acc_t gt, acc_t* dz, acc_t* dr) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vinv(inv_t), vlz(lse_z), vlr(lse_r), vkl(kl), vg(gt), zero(0);
  // all lanes off in a row of zero upstream gradient: a masked row's dz is 0, even where its KL is infinite
  const Vec live = vg != zero;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t lanes = std::min<int64_t>(Vec::size(), n - i);
    // z = x/T rounded first, then z - lse (not one FMA): at the maximum of a one-entry row lse = Mz/T
    // exactly, so log p = 0 and the gradient is exactly 0, as the reference
    Vec lp = (Vec::loadu(xs + i, lanes) * vinv) - vlz;
    Vec lq = (Vec::loadu(rs + i, lanes) * vinv) - vlr;
    Vec p = fast_exp(lp);
    // NaN logits stay NaN, as on the GPU: fast_exp clamps NaN to a finite value and p > 0 is false for NaN
    const Vec d = Vec::blendv(zero, vg * p * (lp - lq - vkl), (p > zero) & live);
    Vec::blendv(d, lp, lp != lp).store(dz + i, lanes);
    if (dr != nullptr) {
      const Vec either = lp + lq;  // NaN where either row's log-prob is
      Vec::blendv(vg * (fast_exp(lq) - p), either, either != either).store(dr + i, lanes);
    }
  }
}

template <typename sx_t, typename sr_t, typename acc_t>
void backward_rows(const sx_t* logits, const sr_t* ref, int64_t rows_inner, int64_t xs_outer, int64_t xs_inner,
                   int64_t rs_outer, int64_t rs_inner, int64_t vocab, double temperature, const acc_t* grad,
                   const acc_t* kl, const acc_t* lse_z, const acc_t* lse_r, sx_t* dz_out, int64_t dz_outer,
                   int64_t dz_inner, sr_t* dr_out, int64_t dr_outer, int64_t dr_inner, int64_t begin, int64_t end) {
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  alignas(64) acc_t bx[kChunk];
  alignas(64) acc_t br[kChunk];
  alignas(64) acc_t gz[kChunk];
  alignas(64) acc_t gr[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const sx_t* x = row_at(logits, row, rows_inner, xs_outer, xs_inner);
    const sr_t* r = row_at(ref, row, rows_inner, rs_outer, rs_inner);
    sx_t* dz = row_at(dz_out, row, rows_inner, dz_outer, dz_inner);
    sr_t* dr = dr_out == nullptr ? nullptr : row_at(dr_out, row, rows_inner, dr_outer, dr_inner);
    const acc_t gt = grad[row] * inv_t;
    for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
      const int64_t n = std::min(kChunk, vocab - c0);
      // straight into the outputs when they are in the accumulation type, else through gz / gr
      acc_t* dz_c = std::is_same<sx_t, acc_t>::value ? reinterpret_cast<acc_t*>(dz + c0) : gz;
      acc_t* dr_c = dr == nullptr ? nullptr : (std::is_same<sr_t, acc_t>::value ? reinterpret_cast<acc_t*>(dr + c0) : gr);
      chunk_kl_grad(chunk_source(x + c0, n, bx), chunk_source(r + c0, n, br), n, inv_t, lse_z[row], lse_r[row],
                    kl[row], gt, dz_c, dr_c);
      if (dz_c == gz) {
        for (int64_t j = 0; j < n; ++j) dz[c0 + j] = static_cast<sx_t>(gz[j]);
      }
      if (dr_c == gr) {
        for (int64_t j = 0; j < n; ++j) dr[c0 + j] = static_cast<sr_t>(gr[j]);
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_divergence_fwd(const at::Tensor& logits,
                                                                 const at::Tensor& ref_logits, double temperature) {
  const auto [x, r] = io::kl_inputs(logits, ref_logits, at::kCPU);
  const int64_t B = x.size(0), T = x.size(1), V = x.size(2), rows = B * T;
  auto opts = x.options().dtype(io::kl_stats_dtype(logits, ref_logits));
  at::Tensor kl = at::empty({B, T}, opts), lse_z = at::empty({B, T}, opts), lse_r = at::empty({B, T}, opts);
  if (rows == 0) return {kl, lse_z, lse_r};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kl_divergence_fwd_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    acc_t *klp = kl.data_ptr<acc_t>(), *lzp = lse_z.data_ptr<acc_t>(), *lrp = lse_r.data_ptr<acc_t>();
    at::parallel_for(0, rows, grain_for(2 * V), [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t, scalar_t, acc_t>(xp, rp, T, x.stride(0), x.stride(1), r.stride(0), r.stride(1), V,
                                              temperature, klp, lzp, lrp, begin, end);
    });
  });
  return {kl, lse_z, lse_r};
}

std::tuple<at::Tensor, at::Tensor> kl_divergence_bwd(const at::Tensor& grad, const at::Tensor& logits,
                                                     const at::Tensor& ref_logits, const at::Tensor& kl,
                                                     const at::Tensor& lse_z, const at::Tensor& lse_r,
                                                     double temperature, bool need_ref_grad,
                                                     const std::optional<at::Tensor>& grad_out,
                                                     const std::optional<at::Tensor>& ref_grad_out) {
  const auto [x, r] = io::kl_inputs(logits, ref_logits, at::kCPU);
  const int64_t B = x.size(0), T = x.size(1), V = x.size(2), rows = B * T;
  const auto acc = io::kl_stats_dtype(logits, ref_logits);
  const at::Tensor g = io::per_row(grad, rows, acc, x, "grad"), kl_c = io::per_row(kl, rows, acc, x, "kl");
  const at::Tensor lz = io::per_row(lse_z, rows, acc, x, "lse_z"), lr = io::per_row(lse_r, rows, acc, x, "lse_r");
  io::KlGrads out = io::kl_grad_buffers(logits, ref_logits, x, r, need_ref_grad, grad_out, ref_grad_out);
  if (rows > 0 && V > 0) {
    advise_huge_pages(out.dz);
    if (need_ref_grad) advise_huge_pages(out.dr);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kl_divergence_bwd_cpu", [&] {
      using acc_t = acc_type_t<scalar_t>;
      scalar_t* drp = need_ref_grad ? out.dr.data_ptr<scalar_t>() : nullptr;
      const int64_t dr_outer = need_ref_grad ? out.dr.stride(0) : 0, dr_inner = need_ref_grad ? out.dr.stride(1) : 0;
      at::parallel_for(0, rows, grain_for(2 * V), [&](int64_t begin, int64_t end) {
        backward_rows<scalar_t, scalar_t, acc_t>(
            x.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), T, x.stride(0), x.stride(1), r.stride(0),
            r.stride(1), V, temperature, g.const_data_ptr<acc_t>(), kl_c.const_data_ptr<acc_t>(),
            lz.const_data_ptr<acc_t>(), lr.const_data_ptr<acc_t>(), out.dz.data_ptr<scalar_t>(), out.dz.stride(0),
            out.dz.stride(1), drp, dr_outer, dr_inner, begin, end);
      });
    });
  }
  return io::kl_grad_result(out, logits, ref_logits, need_ref_grad, grad_out, ref_grad_out);
}

}  // namespace cpu
}  // namespace rlhf_kernels
