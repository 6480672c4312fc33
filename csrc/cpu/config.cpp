// Configuration read once; see config.h.
#include "cpu/config.h"

#include <cstdlib>

#include "cpu/team.h"

namespace seqfast {
namespace cpu {
namespace {

int64_t env_int(const char* name, int64_t dflt) {
  const char* e = std::getenv(name);
  return (e && *e) ? std::atoll(e) : dflt;
}
bool env_set(const char* name) { return std::getenv(name) != nullptr; }

Config from_env() {
  Config c;
  c.own_gemm = !env_set("SEQFAST_CPU_NO_OWN_GEMM");
  c.blas_native = env_int("SEQFAST_CPU_BLAS_NATIVE", c.blas_native);
  c.fused = !env_set("SEQFAST_CPU_NO_FUSED");
  c.mkl_pack = !env_set("SEQFAST_CPU_NO_PACK");
  c.avx2_lstm_step = !env_set("SEQFAST_CPU_NO_AVX2_LSTM_STEP");
  c.avx512_attention = !env_set("SEQFAST_CPU_NO_AVX512_ATTN");
  c.avx2_decode = !env_set("SEQFAST_CPU_NO_AVX2_DECODE");
  c.avx512_nt = !env_set("SEQFAST_CPU_NO_AVX512_NT");
  c.avx512_wt = !env_set("SEQFAST_CPU_NO_AVX512_WT");
  c.avx512_gemv = !env_set("SEQFAST_CPU_NO_AVX512_GEMV");
  c.avx512_pointwise = !env_set("SEQFAST_CPU_NO_AVX512_POINTWISE");
  c.bf16_rnn_step = !env_set("SEQFAST_CPU_NO_BF16_RNN_STEP");
  c.bf16_products = !env_set("SEQFAST_CPU_NO_BF16_PRODUCTS");
  c.avx2_attention = !env_set("SEQFAST_CPU_NO_AVX2_ATTN");
  c.avx2_pack = !env_set("SEQFAST_CPU_NO_AVX2_PACK");
  c.nt_cells = !env_set("SEQFAST_CPU_NO_NT_CELLS");
  c.rows_split = !env_set("SEQFAST_CPU_NO_ROWS_SPLIT");
  c.par_min_work = env_int("SEQFAST_CPU_PAR_MIN_WORK", c.par_min_work);
  c.small_batch_set = env_set("SEQFAST_CPU_SMALL_BATCH");
  c.small_batch = env_int("SEQFAST_CPU_SMALL_BATCH", c.small_batch);
  c.step_par_min_h = env_int("SEQFAST_CPU_STEP_PAR_MIN_H", c.step_par_min_h);
  c.pool_mb = env_int("SEQFAST_CPU_POOL_MB", c.pool_mb);
  c.max_threads = env_int("SEQFAST_CPU_THREADS", c.max_threads);
  c.contention_backoff = !env_set("SEQFAST_CPU_NO_BACKOFF");
  c.block_share = !env_set("SEQFAST_CPU_NO_BLOCK_SHARE");
  return c;
}

Config& current() {
  static Config c = from_env();
  return c;
}

}  // namespace

const Config& config() { return current(); }

void reload_config() {
  current() = from_env();
  refresh_usable_cpus();
}

void set_config(const Config& c) { current() = c; }

}  // namespace cpu
}  // namespace seqfast
