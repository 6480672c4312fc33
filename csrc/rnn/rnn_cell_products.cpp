// The products of a cell step's backward at a few rows (see rnn_cell_products.h). Plain loops over contiguous rows,
// vectorised by the compiler inside the AVX2 + FMA region; this unit includes no ATen header (the rule of cpu/isa.h).
#include "rnn/rnn_cell_products.h"

#include "cpu/isa.h"

#include <cstring>

SEQFAST_TARGET_AVX2_BEGIN

namespace seqfast {
namespace cell_products {
namespace {

// y[0:n] += a * w[0:n]
template <typename T>
inline void axpy(int64_t n, T a, const T* __restrict w, T* __restrict y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * w[i];
}

// d[0:n] = sum over b < B of g[b * G] * v[b * n + 0:n] (the gradient row of one weight row)
template <typename T>
inline void outer_row(int64_t B, int64_t G, const T* g, const T* __restrict v, int64_t n, T* __restrict d) {
  const T a0 = g[0];
  for (int64_t i = 0; i < n; ++i) d[i] = a0 * v[i];
  for (int64_t b = 1; b < B; ++b) {
    const T a = g[b * G];
    const T* vb = v + b * n;
    for (int64_t i = 0; i < n; ++i) d[i] += a * vb[i];
  }
}

}  // namespace

template <typename T>
void backward(int64_t B, int64_t G, int64_t I, int64_t H, const T* dgi, const T* dgh, const T* x, const T* h,
              const T* w_ih, const T* w_hh, T* dx, T* dh, bool dh_accumulate, T* dw_ih, T* dw_hh, T* db_i, T* db_h) {
  if (dx) std::memset(dx, 0, size_t(B * I) * sizeof(T));
  if (dh && !dh_accumulate) std::memset(dh, 0, size_t(B * H) * sizeof(T));
  for (int64_t g = 0; g < G; ++g) {
    const T* wi = w_ih + g * I;
    const T* wh = w_hh + g * H;
    for (int64_t b = 0; b < B; ++b) {
      if (dx) axpy(I, dgi[b * G + g], wi, dx + b * I);
      if (dh) axpy(H, dgh[b * G + g], wh, dh + b * H);
    }
    if (B > 0) {
      if (dw_ih) outer_row(B, G, dgi + g, x, I, dw_ih + g * I);
      if (dw_hh) outer_row(B, G, dgh + g, h, H, dw_hh + g * H);
    } else {
      if (dw_ih) std::memset(dw_ih + g * I, 0, size_t(I) * sizeof(T));
      if (dw_hh) std::memset(dw_hh + g * H, 0, size_t(H) * sizeof(T));
    }
  }
  for (int64_t g = 0; g < G && (db_i || db_h); ++g) {
    T si = T(0), sh = T(0);
    for (int64_t b = 0; b < B; ++b) {
      si += dgi[b * G + g];
      sh += dgh[b * G + g];
    }
    if (db_i) db_i[g] = si;
    if (db_h) db_h[g] = sh;
  }
}

template void backward<float>(int64_t, int64_t, int64_t, int64_t, const float*, const float*, const float*,
                              const float*, const float*, const float*, float*, float*, bool, float*, float*, float*,
                              float*);
template void backward<double>(int64_t, int64_t, int64_t, int64_t, const double*, const double*, const double*,
                               const double*, const double*, const double*, double*, double*, bool, double*, double*,
                               double*, double*);

}  // namespace cell_products
}  // namespace seqfast

SEQFAST_TARGET_END
