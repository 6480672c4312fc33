// Run-time configuration of the C++ kernels (seqfast._C internal), read ONCE: from the SEQFAST_CPU_* environment
// variables when the module loads, again on an explicit reload_config(), or set field by field with set_config()
// (bound to Python, so tests force an internal path by a call instead of an environment variable). Kernels read
// config() and never call getenv: a hot path that runs with the GIL released must not read the environment, which
// a concurrent os.environ write can change under it.
// set_config/reload_config are meant for tests and tuning, between calls: a kernel running meanwhile in another
// thread may see the old or the new value of a field.
#pragma once

#include <cstdint>

namespace seqfast {
namespace cpu {

struct Config {
  // SEQFAST_CPU_NO_OWN_GEMM unset: the own AVX-512 GEMM and the other AVX-512 kernels (fused LSTM step, attention
  // blocks) run on CPUs that have AVX-512; false forces the BLAS / AVX2 paths everywhere.
  bool own_gemm = true;
  // SEQFAST_CPU_BLAS_NATIVE=0|1 forces gemm.cpp's blas_native (whether the BLAS runs its own AVX-512 kernels here,
  // so that it takes the products it computes faster than the own GEMM); -1 (unset): from the CPU's vendor.
  int64_t blas_native = -1;
  // SEQFAST_CPU_NO_FUSED unset: RNN sequences run their time loop in one parallel region (see rnn_sequence.cpp).
  bool fused = true;
  // SEQFAST_CPU_NO_PACK unset: the fused loops pack W_hh slices once with MKL's packed GEMM (no own GEMM).
  bool mkl_pack = true;
  // SEQFAST_CPU_NO_AVX2_LSTM_STEP unset: on CPUs without the AVX-512 kernels, float32 LSTM layers above the GEMV range
  // run the fused AVX2 step (rnn_sequence_lstm_step.h); false: the fused loop's GEMM + pointwise pass.
  bool avx2_lstm_step = true;
  // SEQFAST_CPU_NO_AVX512_ATTN unset: float32 attention runs the AVX-512 block kernels where the CPU has them.
  bool avx512_attention = true;
  // SEQFAST_CPU_NO_AVX2_DECODE unset: float32 / bfloat16 decoder steps (query length 1) run the AVX2 kernel of
  // attention/attention_decode_avx2.h on CPUs with AVX2 + FMA (AVX-512 ones included); false: the generic row loops.
  bool avx2_decode = true;
  // SEQFAST_CPU_NO_AVX512_NT unset: on CPUs with AVX-512 the own dot-product GEMM (cpu/sgemm_nt.h) runs its AVX-512
  // twin; false: its AVX2 form.
  bool avx512_nt = true;
  // SEQFAST_CPU_NO_AVX512_WT unset: on CPUs with AVX-512, products A W^T of 16-256 rows (gemm::wt_takes) run the
  // broadcast form of cpu/sgemm_wt.h; false: the dot-product form or the packed GEMM, as before it.
  bool avx512_wt = true;
  // SEQFAST_CPU_NO_AVX512_GEMV unset: on CPUs with AVX-512 the small-batch float32 GEMV (cell steps, 1-2 row time
  // loops; kern::gemv) runs its AVX-512 form (cpu/gemv_avx512.h); false: its AVX2 form.
  bool avx512_gemv = true;
  // SEQFAST_CPU_NO_AVX512_POINTWISE unset: on CPUs with AVX-512 the float32 Elman RNN, LSTM and GRU rows' forward
  // updates (kern::rnn_fwd_row, lstm_fwd_row, gru_fwd_row) run their AVX-512 forms (cpu/pointwise_avx512.h); false:
  // the AVX2 ones.
  bool avx512_pointwise = true;
  // SEQFAST_CPU_NO_BF16_RNN_STEP unset: on CPUs with AVX512_BF16, bfloat16 LSTM, GRU and RNN layers take the
  // fused bfloat16 steps (rnn/rnn_sequence_step_bf16.h); false: the bf16-GEMM loop of the other CPUs.
  bool bf16_rnn_step = true;
  // SEQFAST_CPU_NO_BF16_PRODUCTS unset: on CPUs with AVX512_BF16 a bfloat16 RNN layer's backward runs its weight-sized
  // products (dx, dW_ih, dW_hh) as bfloat16 GEMMs; false: the whole backward in float32 on upcast copies.
  bool bf16_products = true;
  // SEQFAST_CPU_NO_AVX2_ATTN unset: the float32 attention forward (query length > 1) and backward (8+ query rows) run
  // the AVX2 blocks of attention/attention_avx2.h on CPUs with AVX2 + FMA where the AVX-512 ones do not run; false:
  // the BLAS blocks.
  bool avx2_attention = true;
  // SEQFAST_CPU_NO_AVX2_PACK unset: on CPUs with AVX2 + FMA and no AVX-512 kernels, the own AVX2 kernels pack weights
  // for their outer-product form (sgemm_nn.h): a time loop's recurrent W_hh slices once per call when the call has 2+
  // steps (gemm_packed), and W k-slice by k-slice in products of many rows (gemm_nt: input projections, cells at
  // large batch), and the backward's B k-slice by k-slice (gemm_nn_packing: weight gradients over a small batch);
  // false: the kernels read them in place, and BLAS takes the products it took before packing (the many-row forward
  // products, the backward's at 33-64 rows and the weight gradients over a batch of 2-8).
  bool avx2_pack = true;
  // SEQFAST_CPU_NO_NT_CELLS unset: float32 cell steps whose two gate products both run on the own AVX2 dot-product
  // kernel (sgemm_nt.h) take them and the cell update in one region, the products summed in one pass
  // (rnn_cell.cpp: fused_nt); false: two linear_out products and a pointwise pass.
  bool nt_cells = true;
  // SEQFAST_CPU_NO_ROWS_SPLIT unset: a float32 time loop whose weights fit half a core's L2 (the backward loops, the
  // GRU and RNN forward loop, the LSTM's fused step) splits the batch rows between its threads (rnn_sequence.cpp:
  // rows_split, rows_split_fits); false: the units split with a barrier per step (the per-step path for the Elman
  // RNN's backward).
  bool rows_split = true;
  // SEQFAST_CPU_PAR_MIN_WORK: multiply-adds below which a step runs on one thread (fork/join costs more).
  int64_t par_min_work = int64_t(1) << 17;
  // SEQFAST_CPU_SMALL_BATCH: largest batch the hand-written GEMV takes (at most 16). small_batch_set records
  // that it was given explicitly (the float32 AVX-512 paths then use it instead of their own 1-2 row range).
  int64_t small_batch = 8;
  bool small_batch_set = false;
  // SEQFAST_CPU_STEP_PAR_MIN_H: hidden size from which the 1-2 row AVX-512 LSTM step splits over threads.
  int64_t step_par_min_h = 64;
  // SEQFAST_CPU_POOL_MB: megabytes of idle workspace blocks the pool keeps (0: no pooling).
  int64_t pool_mb = 256;
  // SEQFAST_CPU_THREADS: upper bound on the threads of a seqfast parallel region (0: the CPUs this process may
  // use, from its affinity mask and cgroup v2 cpu.max quota). torch.set_num_threads bounds it too.
  int64_t max_threads = 0;
  // SEQFAST_CPU_NO_BACKOFF unset: after a multi-threaded region that saw contention (a thread started late, a
  // barrier wait slept), the next regions run on the calling thread alone (cpu/team.h). false: every region gets
  // its full team whatever happened before (for A/B timing on a loaded machine).
  bool contention_backoff = true;
  // SEQFAST_CPU_NO_BLOCK_SHARE unset: a team shares its work in pieces (cpu/block_share.h): the fused time loops'
  // unit blocks each step (the LSTM step's, the generic loop's slices), the own GEMMs' column or row tiles, a cell
  // step's units and the SDPA forward's tasks (cpu::parallel_for_shared), so that a thread done with its own takes a
  // slower teammate's last pieces; false: the fixed split.
  bool block_share = true;
  // Test hook, set_config only (0 outside tests): every thread but the first waits this many microseconds at the
  // start of each shared step or region (cpu::BlockShare::run), so that the first takes their blocks (the path a
  // slow teammate causes).
  int64_t share_test_delay_us = 0;
};

const Config& config();
void reload_config();            // re-reads the environment (and the usable CPU count)
void set_config(const Config&);  // replaces every field

}  // namespace cpu
}  // namespace seqfast
