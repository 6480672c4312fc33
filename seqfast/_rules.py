"""Where torch's own op beats seqfast's kernel: the performance floor's rule table.

A drop-in must never be slower than what it replaces. ``make bench-sweep`` times torch and seqfast on the same
inputs over ops x dtypes x batch x hidden x inference/training; each rule below names a region where torch's op was
the faster one on a class of CPU, with the run it comes from. Dispatch (seqfast.functional) asks
:func:`prefer_torch` before it calls a seqfast kernel, and runs torch's op there instead (same results, torch's
speed). A forced backend (``SEQFAST_BACKEND`` / ``seqfast.use_backend``) bypasses the table.

CPU classes come from the features torch reports at run time, not from a model name: "amx" (AVX-512 with AMX tiles)
and "avx512_bf16" (AVX-512 with AVX512_BF16, no AMX): torch's bfloat16 RNNs and GEMMs run native oneDNN kernels on
both; "avx512", "avx2" (AVX2+FMA, no AVX-512: the C++ kernels take their AVX2 / MKL paths), "other"."""
import functools

import torch

from . import _backend


@functools.lru_cache(maxsize=None)
def cpu_class():
    """The CPU class of this machine (see the module docstring)."""
    cpu = torch.cpu
    if cpu._is_avx512_supported():
        if cpu._is_amx_tile_supported():
            return "amx"
        return "avx512_bf16" if cpu._is_avx512_bf16_supported() else "avx512"
    return "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "other"


class Rule:
    """torch's op is faster for ``family`` ("lstm", "gru", "rnn", "lstm_cell", "gru_cell", "rnn_cell", "sdpa") in
    ``dtype`` on ``cpus`` when every given bound holds: ``training`` (True / False / None = either), ``batch`` and
    ``hidden`` as inclusive (low, high) ranges (None = any), ``causal`` (SDPA: True / False / None = either).
    For "sdpa", ``batch`` is the query length, ``hidden`` the key length and ``head_dim`` (an inclusive range, None =
    any) the query's head dim. ``steps`` (sequences only, an inclusive range, None = any): the sequence's time steps;
    a caller that does not know them matches any bound. RNNs: ``work``, an inclusive range of batch x hidden^2 (a
    step's multiply-adds per gate and input), and ``past_float32``: only batches past float32_bfloat16_max_batch's
    bound for the call's hidden size (the calls seqfast does not compute in float32).
    ``source``: the sweep run that measured it.
    Family "sdpa_upcast" (bfloat16, bounds as for "sdpa"): a bfloat16 call that sdpa_upcasts_bfloat16 would compute
    in float32 on upcast copies keeps torch's bfloat16 op instead (the float32 kernel wins over torch's float32 op
    there, not over its bfloat16 one)."""

    def __init__(self, family, dtype, cpus, *, training=None, batch=None, hidden=None, causal=None, head_dim=None,
                 steps=None, work=None, past_float32=False, source):
        self.family, self.dtype, self.cpus = family, dtype, frozenset(cpus)
        self.training, self.batch, self.hidden, self.causal, self.source = training, batch, hidden, causal, source
        self.head_dim, self.steps, self.work, self.past_float32 = head_dim, steps, work, past_float32

    def batches(self, hidden):
        """The rule's inclusive batch range at ``hidden`` (work and past_float32 narrow it)."""
        low, high = self.batch or (0, INF)
        if self.work is not None:
            square = max(1, hidden * hidden)
            low, high = max(low, -(-self.work[0] // square)), min(high, self.work[1] // square)
        if self.past_float32:
            low = max(low, float32_bfloat16_max_batch(self.family, hidden) + 1)
        return low, high

    def _holds_batch(self, batch, hidden):
        if self.batch is None and self.work is None and not self.past_float32:
            return True
        low, high = self.batches(hidden)
        return low <= batch <= high

    def matches(self, family, dtype, cpu, training, batch, hidden, causal, head_dim=0, steps=None):
        return (family == self.family and dtype == self.dtype and cpu in self.cpus
                and (self.training is None or self.training == training)
                and (self.causal is None or self.causal == causal)
                and self._holds_batch(batch, hidden)
                and (self.hidden is None or self.hidden[0] <= hidden <= self.hidden[1])
                and (self.head_dim is None or self.head_dim[0] <= head_dim <= self.head_dim[1])
                and (self.steps is None or steps is None or self.steps[0] <= steps <= self.steps[1]))


BF16 = torch.bfloat16
F32 = torch.float32

INF = 1 << 62
AVX512_BF16 = ("avx512_bf16", "amx")  # native bfloat16 (measured on a Zen 5; one-step training held on the Xeon)
BF16_NO_AMX = ("avx512_bf16",)  # AVX512_BF16 without AMX tiles (torch's bfloat16 GEMMs on vdpbf16ps, as seqfast's)
AMX = ("amx",)
AVX2 = ("avx2",)
_ZEN3 = "make bench-sweep, sweep-cpu-20261204-194326 (AMD EPYC family 25 model 1, AVX2, 2 threads), commit c6aed95"
_ZEN3_OWN_GEMM = ("same-process A/B, rules on / off, rotating order, 7 rounds, on commit 1c58745 (the own AVX2 GEMMs) on "
                  "the same AMD EPYC family 25 model 1")
_ZEN3_SETTLED = ("same-process A/B, rules on / off, torch interleaved, 11 rounds, each share after the process's other threads "
                 "went idle (benchmarks/timing.py), on commit 06555b1 on the same AMD EPYC family 25 model 1")
_ZEN3_STEP = ("same-process A/B, torch / seqfast with the rule table off, 8 rounds, each share after the process's other "
              "threads went idle, on the fused AVX2 LSTM step (commit 5c46dc4 + the barrier's contention test by time "
              "slept) on the same AMD EPYC family 25 model 1")
_ZEN3_DECODE = ("same-process A/B, torch interleaved, 9-11 rounds, each share after the process's other threads went "
                "idle, on the AVX2 decode kernel (2026-12-05) on the same AMD EPYC family 25 model 1")
_ZEN3_SHARED = ("same-process A/B, torch and ONNX Runtime interleaved, 31 rounds, two runs in opposite orders, each "
                "share after the process's other threads went idle, on commit 24a4c1a (the SDPA forward's shared tasks) "
                "on the same AMD EPYC family 25 model 1")
_ZEN3_ATTN = ("same-process A/B, torch interleaved, 7 rounds, each share after the process's other threads went idle, "
              "on the AVX2 attention forward block (2026-12-05) on the same AMD EPYC family 25 model 1")
_ZEN3_MALLOC = ("same-process A/B, torch / seqfast with the rule table off, 6-8 rounds, glibc malloc never returning "
                "memory (MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=4e9), on commit 3bba69c on the same AMD EPYC "
                "family 25 model 1")
_ZEN3_SHORT = ("same-process A/B, torch / seqfast with the rule table off, 7 rounds, each share after the process's other "
               "threads went idle, on commit f74ffb7 (no MKL packing where the own AVX2 kernel takes the product) on the "
               "same AMD EPYC family 25 model 1")
_ZEN3_BACKWARD = ("same-process A/B, torch / seqfast with the rule table off, 21 rounds, each share after the "
                  "process's other threads went idle, on commit 87c9f01 (backward GEMMs on the own AVX2 kernel) on "
                  "the same AMD EPYC family 25 model 1")
_ZEN3_B1_RNN_CELL = ("same-process A/B, torch / seqfast with the rule table off, 9 rounds, each share after the "
                     "process's other threads went idle, on commit f8d36c8 on the same AMD EPYC family 25 model 1; "
                     "make bench-sweep sweep-cpu-20261206-074108")
_ZEN3_B1_RNN_LAYER = ("same-process A/B, torch / seqfast's kernel / seqfast forced to torch's op, 21 rounds, on commit "
                      "a8c69c0 on the same AMD EPYC family 25 model 1; make bench-sweep sweep-cpu-20261206-104924 and "
                      "-112555")
_ZEN3_BF16_RNN_CELL = ("same-process A/B, torch / seqfast's kernel / seqfast with the rule, 41 rounds, each share "
                       "after the process's other threads went idle, on commit 3d5bf2c (+ the C++ call running "
                       "torch's op for bfloat16 training rules) on the same AMD EPYC family 25 model 1; make "
                       "bench-sweep sweep-cpu-20261206-180155 to -205719")
_XEON_AMX = ("make bench-sweep, sweep-cpu-20261208-002725 (Intel Xeon family 6 model 167, AVX-512 + AMX, 2 threads), "
             "commit 9299f92")
_XEON_AMX_DECODE = ("same-process, torch / seqfast's kernel (use_backend cpp) interleaved, 11 rounds, on commit f098210 "
                    "on the same Intel Xeon")
_XEON_AMX_RNN = ("same-process, torch / seqfast without the table's bfloat16 rules interleaved, 3-5 rounds, make "
                 "bench-sweep's bfloat16 RNN cases and the regions' edges, the fused bfloat16 steps and the float32 "
                 "path on, on the same Intel Xeon, 2026-12-08")
_ZEN5_BF16 = ("same-process A/B, torch / seqfast with the rule table / seqfast without it, 11 rounds, the sweep's "
              "cases (benchmarks/cases.py), on commit 0c336a6 on an AMD EPYC family 26 model 2 (Zen 5, AVX-512 + "
              "AVX512_BF16, 2 threads); make bench-sweep sweep-cpu-20261206-223110")
_ZEN5_LSTM_BF16 = ("same-process A/B, torch / the fused bfloat16 LSTM step / the bf16-GEMM loop, no rules, 11 rounds, "
                   "the sweep's cases, on the commit that added the step, AMD EPYC family 26 model 2")
_ZEN5_GRU_BF16 = ("same-process A/B, torch / the fused bfloat16 GRU step / the bf16-GEMM loop / the float32 path, no "
                  "rules for the family, 11 rounds, the sweep's cases, on the commit that added the step, AMD EPYC "
                  "family 26 model 2")
_ZEN5_F32_STEP = ("same-process A/B, torch / seqfast / seqfast with the rule, 21 rounds, make bench-sweep's one-step "
                  "cases, on commit 63be828, AMD EPYC family 26 model 2")
_ZEN5_T1_RECORDED = ("same-process A/B, torch / seqfast's cell steps recorded from C++ / torch's op run from the "
                     "module's C++ call, 15 rounds of a training step (forward, backward of the output's sum), on "
                     "the commit that records one-step calls so, AMD EPYC family 26 model 2")
_ZEN5_BF16_BWD = ("same-process A/B, torch / seqfast without the family's rules / seqfast with them, 5-9 rounds, T32, "
                  "on the commit whose backward runs its weight-sized products in bfloat16, AMD EPYC family 26 model 2")
_ZEN5_SDPA_BF16 = ("same-process A/B, torch / seqfast with the rule table / seqfast without the bfloat16 SDPA rules, 7 "
                   "rounds, batch 1 (4 at L2-100) x 8 heads, on the commit whose bfloat16 SDPA computes in float32 "
                   "on upcast copies, AMD EPYC family 26 model 2")
_ZEN3_LATER = ("make bench-sweep runs 201033 and 214300 and make bench runs cpu-20261204-200307 / 214050 on the same "
               "AMD EPYC family 25 model 1")

RULES = [
    # bfloat16 on AVX512_BF16 CPUs: torch runs oneDNN's native bf16 RNN kernels; seqfast's C++ path computes its gates
    # in float32 and its bf16 backward upcasts. Measured on main ed888a7 (issue 15's sweep on an AVX512_BF16 EPYC:
    # bf16 LSTM 0.39-0.90x at every shape tried, bf16 GRU training 0.64-0.72x at batch >= 64, bf16 causal SDPA
    # training at length 2048 0.77x) and on the Zen 4 the kernels were tuned on (benchmarks/results/
    # cpu-20261127-134733.md: bf16 GRU T64 B64 H512 training 0.77x; earlier runs bf16 LSTM B64 H512 0.65-0.80x).
    # The LSTM rule covered every call until the Zen 5 (_ZEN5_BF16): there seqfast's kernel (float32 gates, the weights
    # read as bfloat16) won the one-step calls, short sequences at batch 1, and training at batch 1-2, where torch's
    # oneDNN LSTM carries fixed costs of tens of microseconds. torch's time over seqfast's, no rule: inference T1 B1
    # H512 2.46x, B8 H128 1.32x, B8 H1024 1.74x, B32 H256 1.29x, B64 H512 1.05x, B256 H256 0.79x; T2 / T4 / T32 at B1
    # H512 1.20 / 1.06 / 0.81x, T32 B2 / B4 H256 0.93 / 0.38x; training T1 B1 H512 9.5x, B8 H128 1.40x, B32 H256
    # 1.55x, B256 H256 1.17x, T32 B1 H128 1.33x, B2 H512 1.13x, B4 H512 0.90x, B8 H256 0.65x.
    # (AMX CPUs: the "amx" block below.)
    # With AVX512_BF16 and no AMX, bfloat16 LSTM layers run the fused bfloat16 step (vdpbf16ps). torch's oneDNN LSTM
    # reaches the vdpbf16ps peak on large calls (T32 B64 H1024: 34 GFLOP in 39 ms on 2 cores), so torch's op keeps
    # those. torch's time over seqfast's, the bfloat16 step / the bf16-GEMM loop before it (_ZEN5_LSTM_BF16):
    # inference T32 B1 H512 1.06x / 0.72x, B2 / B4 H256 2.60 / 2.10x / 0.94 / 0.37x, B8 H256 1.54x / 0.39x, B8 H1024
    # 1.05x / 0.49x, B32 H64 2.15x / 0.39x, B32 H512 1.07x / 0.56x, B64 H128 1.31x / 0.47x, B256 H64 1.87x / 0.69x,
    # T4 B8 H256 4.16x, T4 B64 H512 1.21x, T2 B256 H256 1.15x, T1 B128 H512 1.40x, T1 B256 H256 1.27x -- against T32
    # B256 H256 0.96x, B64 H1024 0.99x; training (the backward upcast to float32 then) T32 B1 H512 1.32x, B8 H256 1.16x, B8 H1024 1.57x, B32 H64 1.25x --
    # against B32 H512 0.71x, B64 H128 0.77x, B256 H64 0.68x, B256 H256 0.72x.
    Rule("lstm", BF16, BF16_NO_AMX, training=False, batch=(256, INF), hidden=(256, INF), steps=(8, INF),
         source=_ZEN5_LSTM_BF16),
    Rule("lstm", BF16, BF16_NO_AMX, training=False, batch=(128, INF), hidden=(512, INF), steps=(8, INF),
         source=_ZEN5_LSTM_BF16),
    Rule("lstm", BF16, BF16_NO_AMX, training=False, batch=(64, INF), hidden=(1024, INF), steps=(8, INF),
         source=_ZEN5_LSTM_BF16),
    # Training since the backward runs its weight-sized products in bfloat16 (dx, dW_ih, dW_hh; the time loop in
    # float32), torch's time over seqfast's without the rules (_ZEN5_BF16_BWD; the upcast backward before it: B32 H256
    # 0.73x, B64 H512 0.79x, B256 H256 0.73x): B32 H1024 1.95x, B64 H1024 1.36x -- against B32 H256 0.99x, B32 H512
    # 0.95-0.97x, B48 H512 1.19x, B64 H128 0.91x, B64 H512 0.99-1.12x in three runs, B96 H512 1.12x, B128 H512 0.98x,
    # B128 H1024 1.14x, B256 H64 0.81x, B256 H256 0.98x, B256 H1024 0.86x. torch's per-round times spread 10-25% at
    # these sizes, so torch's op keeps every region whose lead was not clear.
    Rule("lstm", BF16, BF16_NO_AMX, training=True, batch=(32, INF), hidden=(1, 1023), steps=(2, INF),
         source=_ZEN5_BF16_BWD),
    Rule("lstm", BF16, BF16_NO_AMX, training=True, batch=(128, INF), hidden=(1024, INF), steps=(2, INF),
         source=_ZEN5_BF16_BWD),
    Rule("sdpa", BF16, AMX, training=True, batch=(2048, INF), hidden=(2048, INF), causal=True,
         source="issue 15 sweep (main ed888a7)"),
    # Measured on a Zen 5 (AMD EPYC family 26 model 2; _ZEN5_BF16): the first sweep there (sweep-cpu-20261206-223110)
    # read RNN training at B64 H512 / B256 H256 0.69x, GRU inference at B256 H512 0.84x, non-causal SDPA at L2048 D64
    # inference 0.82x and L512 D64 training 0.83x. torch's time over seqfast's, no rule / the region's bounds:
    # RNN training (T32): from batch 4 at hidden 1024 (B4 0.79x, B8 0.90x; B1 1.30x, B2 1.11x keep the kernel),
    # from batch 16 at 512 (B16 0.86x, B32 0.83x, B64 0.60x; B8 1.14x), from batch 64 at 256 (B64 0.81x, B128 0.55x,
    # B256 0.52x; B32 1.16x), from batch 128 below that (B128 H128 0.69x, B256 H128 0.47x, B256 H64 0.68x; B64 H128
    # 1.18x). (Those rules have since been replaced by the ones below.)
    # Without AMX, since the backward's weight-sized products run in bfloat16 (_ZEN5_BF16_BWD): B4 H1024 2.04x, B8 H1024
    # 1.58x, B16 H512 1.82x, B64 H256 1.53x, B128 H128 1.46x, B256 H64 1.60x, B256 H128 1.33x -- against B16 H1024
    # 1.09-1.34x, B32 H1024 0.78-1.05x, B64 H512 0.89-1.12x, B128 H256 1.02-1.18x (two or three runs each: kept on
    # torch's op, whose lead there was not clear), B64 H1024 0.95x, B256 H1024 0.66x, B128 H512 0.86x, B256 H512
    # 0.81x, B256 H256 0.97x.
    Rule("rnn", BF16, BF16_NO_AMX, training=True, batch=(16, INF), hidden=(1024, INF), source=_ZEN5_BF16_BWD),
    Rule("rnn", BF16, BF16_NO_AMX, training=True, batch=(64, INF), hidden=(512, 1023), source=_ZEN5_BF16_BWD),
    Rule("rnn", BF16, BF16_NO_AMX, training=True, batch=(128, INF), hidden=(256, 511), source=_ZEN5_BF16_BWD),
    # One-step training calls of RNN and GRU (a decoder trained one token per call): the step is mostly autograd's
    # bookkeeping, and seqfast's kernel read 0.91-1.08x torch (sweep-cpu-20261206-235215: RNN T1 B1 H512 / B8 H128
    # 0.90x, GRU T1 B8 H128 0.91x, B1 H512 0.93x); torch's op run from the module's C++ call read 1.04-1.12x
    # (same-process, 11 rounds, B1-32, H128-512, on commit 13c8a13)
    Rule("rnn", BF16, AVX512_BF16, training=True, steps=(1, 1), source=_ZEN5_BF16),
    # and in float32 at batch 1 from hidden 1024 (RNN) / 512 (GRU). Since the module's C++ call records such a step
    # as C++ cell nodes (csrc/rnn/rnn_cell_autograd.h), torch's time over seqfast's cell steps / over torch's op run
    # from the call (_ZEN5_T1_RECORDED): RNN T1 B1 H64 / 128 / 256 / 512 / 1024 1.63 / 1.58 / 1.52 / 1.27 / 0.99x
    # against 1.13 / 1.10 / 1.10 / 1.04 / 1.03x; GRU 1.99 / 1.94 / 1.50 / 0.91 / 0.81x against 1.07 / 1.07 / 1.03 /
    # 0.90 / 1.04x; batch 8, hidden 128: RNN 1.60x / 1.44x, GRU 2.11x / 2.09x. (Before those nodes, the Python cell
    # steps lost to torch's op at every hidden size: RNN T1 B1 H256 1.11x / 1.31x, GRU H512 0.93x / 1.29x,
    # _ZEN5_F32_STEP.)
    Rule("rnn", F32, BF16_NO_AMX, training=True, batch=(1, 1), steps=(1, 1), hidden=(1024, INF),
         source=_ZEN5_T1_RECORDED),
    Rule("gru", F32, BF16_NO_AMX, training=True, batch=(1, 1), steps=(1, 1), hidden=(512, INF),
         source=_ZEN5_T1_RECORDED),
    Rule("gru", BF16, AVX512_BF16, training=True, steps=(1, 1), source=_ZEN5_BF16),
    # With the fused bfloat16 GRU step (AVX512_BF16, no AMX; its backward upcasts), torch's time over seqfast's, the
    # step / the bf16-GEMM loop before it (_ZEN5_GRU_BF16): inference T32 B1 H256 8.48x / 3.71x, B1 H1024 1.61x /
    # 1.47x, B8 H64 14.5x / 1.41x, B8 H512 2.18x / 1.14x, B32 H128 4.36x / 1.35x, B32 H1024 1.31x / 1.11x, B64 H256
    # 2.09x / 1.31x, B256 H128 2.42x / 1.31x, B256 H512 1.17x / 0.78x; training B1 H256 3.16x, B8 H512 1.44x, B32 H128
    # 2.99x, B64 H256 1.19x, B256 H128 1.14x -- against B32 H1024 0.83x and B256 H512 0.64x (the backward upcast to
    # float32 then). With its weight-sized products in bfloat16 (_ZEN5_BF16_BWD): B32 H1024 1.38x, B64 H512 1.12-1.27x,
    # B64 H1024 1.19x -- against B96 H512 1.02-1.13x (kept on torch's op), B128 H512 / H1024 0.94x, B256 H512 0.85x,
    # B256 H1024 0.84x.
    Rule("gru", BF16, BF16_NO_AMX, training=True, batch=(96, INF), hidden=(512, INF), steps=(2, INF),
         source=_ZEN5_BF16_BWD),
    # SDPA, 8 heads (batch = query length), with the bfloat16 blocks (the BLAS's bfloat16 GEMM per block): non-causal
    # from 256 query rows, inference (L256 0.97x, L256 D128 0.96x, L512 0.93x, L1024 0.88x, L2048 0.89x; L128 1.17x in
    # the sweep) and training (L256 0.87x, L512 0.77x, L512 D128 0.75x, L1024 0.65x; L128 1.56x); causal training from
    # 1024 (L1024 0.92x; L512 D128 1.32x in the sweep). Kept for AMX CPUs: elsewhere the op computes bfloat16 in
    # float32 on upcast copies (csrc/attention/attention.cpp: bf16_upcasts), and training read 1.48-4.4x torch's
    # bfloat16 op without these rules (_ZEN5_SDPA_BF16: L256 / L512 / L1024 / L2048 D64 1.78x / 1.66x / 1.48x /
    # 1.57x, causal L1024 / L2048 2.03x / 1.80x, L256 / L512 D128 1.67x / 1.58x, causal L1024 D128 1.79x; L2-100
    # 1.01-4.4x), where the rules' torch op read 0.96-1.01x.
    Rule("sdpa", BF16, AMX, batch=(256, INF), causal=False, source=_ZEN5_BF16),
    Rule("sdpa", BF16, AMX, training=True, batch=(1024, INF), causal=True, source=_ZEN5_BF16),
    # bfloat16 RNNs on an AMX CPU (Intel Xeon, family 6 model 167; _XEON_AMX_RNN). torch's bfloat16 GEMMs run on AMX
    # tiles there, and its LSTM is oneDNN's (its GRU and RNN loop over those GEMMs). seqfast runs the float32 path
    # inside float32_bfloat16_max_batch's bound (cells, one-step calls, recorded steps) and the fused bfloat16 steps
    # (vdpbf16ps: about an eighth of a tile's multiply-adds per cycle) past it; torch's op takes the regions below.
    # A step's work is batch x hidden^2. torch's time over seqfast's without these rules (T32 unless named):
    # LSTM inference: B1 H64 / 192 / 256 3.84 / 1.67 / 1.33x, B2 H128 / 192 / 256 1.97 / 1.55 / 1.20x, B4 H64 / 128
    #   2.09 / 1.39x, B8 H64 1.79x, B16 H64 1.14x -- against B1 H384 0.70x, B1 H512 0.63x, B32 H64 0.68x, B8 H256 0.46x,
    #   B64 H128 0.41x, B32 H512 0.20x: from work 2^17, 8+ steps. Shorter: T4 B2 H128 2.85x, B8 H128 1.83x, B4 H256
    #   1.60x, B1 H512 1.29x (torch's op from work 2^19, unmeasured there); one step past the float32 bound T1 B2 / B4
    #   / B8 H1024 1.97 / 1.84 / 1.55x, B8 H512 1.52x -- against B16 H512 1.02x, B32 H512 0.71x, B32 H1024 0.76x, B64
    #   H256 0.72x, B64 H512 0.48x, B128 H128 0.77x, B256 H256 0.34x (the step packs its weights per call): from 16.
    Rule("lstm", BF16, AMX, training=False, steps=(8, INF), work=(1 << 17, INF), source=_XEON_AMX_RNN),
    Rule("lstm", BF16, AMX, training=False, steps=(2, 7), work=(1 << 19, INF), source=_XEON_AMX_RNN),
    Rule("lstm", BF16, AMX, training=False, steps=(1, 1), batch=(16, INF), past_float32=True, source=_XEON_AMX_RNN),
    # LSTM training: B1 H128 / 512 1.97 / 1.92x, B2 H1024 1.85x, B4 H512 2.43x, B8 H128 / 256 / 1024 1.29 / 1.04 /
    #   1.51x, B16 H64 1.20x, B16 H1024 1.08x -- against B16 H128 0.98x, B16 H256 0.77x, B32 H64 / 512 0.99 / 0.51x,
    #   B64 H128 0.58x, B64 H1024 0.50x, B256 H64 0.49x: from batch 16.
    Rule("lstm", BF16, AMX, training=True, batch=(16, INF), steps=(2, INF), source=_XEON_AMX_RNN),
    # GRU inference: B1 H256 6.36x, B1 H1024 1.08x, B2 H1024 1.23x, B4 H512 1.48x, B8 H64 8.76x, B16 H256 1.43x, B32
    #   H128 / 256 2.28 / 1.03x, B64 H64 / 128 3.47 / 1.64x, B128 H128 1.36x, B256 H64 / 128 2.04 / 1.00x -- against B8
    #   H512 0.91x, B16 H512 0.69x, B8 H1024 0.68x, B64 H256 0.71x, B32 H1024 0.31x, B256 H512 0.26x: from work 2^21
    #   (from hidden 384), past it below. One step past the float32 bound (T1 B8 H512 0.79x; cells GRUCell B32 H256
    #   0.78x, B64 H512 0.39x), and 2-4 steps at hidden 1024 (T2 / T4 B1 H1024 0.88 / 1.02x; T2 B1 H512 1.18x).
    Rule("gru", BF16, AMX, training=False, hidden=(384, INF), work=(1 << 21, INF), source=_XEON_AMX_RNN),
    Rule("gru", BF16, AMX, training=False, hidden=(1, 383), work=((1 << 21) + 1, INF), source=_XEON_AMX_RNN),
    Rule("gru", BF16, AMX, training=False, steps=(1, 1), past_float32=True, source=_XEON_AMX_RNN),
    Rule("gru", BF16, AMX, training=False, hidden=(1024, INF), steps=(2, 4), source=_XEON_AMX_RNN),
    # GRU training: B1 H1024 2.17x, B8 H512 2.34x, B16 H1024 1.15x, B32 H512 1.08x, B64 H256 1.19x, B256 H128 1.23x
    #   -- against B64 H512 0.83x, B32 H1024 0.83x, B256 H512 0.46x: from work 2^24 (one step: the rule above for
    #   either class).
    Rule("gru", BF16, AMX, training=True, steps=(2, INF), work=(1 << 24, INF), source=_XEON_AMX_RNN),
    # RNN inference: B1 H512 5.16x, B2 / B4 H1024 1.57 / 1.31x, B8 H512 1.59x, B16 H512 1.01x, B32 / B64 H256 1.49 /
    #   1.08x, B256 H128 1.36x -- against B8 H1024 0.81x, B32 H512 0.69x, B128 H256 0.77x, B64 H512 0.49x, B256 H256
    #   0.58x: from work 2^23. One step past the float32 bound: T1 B8 H512 1.19x, B64 H256 1.44x, B128 H128 1.96x --
    #   against B2 / B4 H1024 0.86 / 0.77x, B16 H512 0.94x: from hidden 1024, and from batch 16 at 512.
    Rule("rnn", BF16, AMX, training=False, work=(1 << 23, INF), source=_XEON_AMX_RNN),
    Rule("rnn", BF16, AMX, training=False, hidden=(1024, INF), steps=(1, 1), past_float32=True, source=_XEON_AMX_RNN),
    Rule("rnn", BF16, AMX, training=False, hidden=(512, INF), batch=(16, INF), steps=(1, 1), past_float32=True,
         source=_XEON_AMX_RNN),
    # RNN training: B8 H1024 1.63x, B16 H512 / 1024 1.54 / 1.23x, B32 H512 1.05x, B128 H256 1.07x, B256 H64 1.59x --
    #   against B32 H1024 0.88x, B64 H512 0.78x, B256 H256 0.79x: from work 2^24.
    Rule("rnn", BF16, AMX, training=True, steps=(2, INF), work=(1 << 24, INF), source=_XEON_AMX_RNN),
    # Cells with gradients on the float32 path (inside the bound; past it the call runs torch's op): LSTMCell B32 H128
    #   0.87x, B256 H64 0.96x, RNNCell B64 H128 0.92x, B256 H64 0.92x -- against LSTMCell B8 H256 1.05x, RNNCell B32
    #   H64 1.43x, GRUCell B64 H64 1.30x, B32 H256 0.98x.
    Rule("lstm_cell", BF16, AMX, training=True, batch=(32, INF), hidden=(1, 255), source=_XEON_AMX_RNN),
    Rule("rnn_cell", BF16, AMX, training=True, batch=(64, INF), hidden=(1, 255), source=_XEON_AMX_RNN),
    # Measured on an AMX CPU (Intel Xeon, family 6 model 167; _XEON_AMX): torch's bfloat16 attention runs on AMX tiles
    # there, and the inference calls on seqfast's bfloat16 blocks read 0.53-0.80x (causal L128 / L512 / L2048 0.62 /
    # 0.80 / 0.53x, full L128 0.65x), the decoder step (query length 1) 0.79x at 4096 keys and 0.87x at 1024 (1.04x at
    # 256); training kept seqfast's lead there (L128 2.10-2.97x, causal L512 D128 1.56x).
    Rule("sdpa", BF16, AMX, training=False, batch=(2, INF), source=_XEON_AMX),
    # The decoder step's rule stops at 3071 keys since its kernel prefetches K and V rows there (csrc/attention/
    # attention.cpp: the L3 counted per thread): B16 H8 D64, torch's time over the kernel's (_XEON_AMX_DECODE) 1024
    # keys 0.81x, 2048 0.98x -- against 3072 1.34x, 4096 1.32x, 8192 1.11x (torch's own step slows 2.4x from 2048 to
    # 3072 keys there).
    Rule("sdpa", BF16, AMX, training=False, batch=(1, 1), hidden=(1024, 3071),
         source=_XEON_AMX + "; " + _XEON_AMX_DECODE),
] + [
    # AVX2 without AVX-512 (an AMD EPYC Zen 3, family 25 model 1): the C++ kernels take their MKL / AVX2 paths.
    # Measured by make bench-sweep on commit c6aed95 (sweep-cpu-20261204-194326, 2 threads, 5 rounds per case);
    # each rule covers a region where the measured cases were below 1.0x (the one exception is noted).
    # training at batch >= 128 (was every size, 0.86-0.96x; with the own AVX2 GEMMs seqfast's cell read 1.03-1.38x at
    # batch 1-64, hidden 128-1024, and 0.74x at B256 H512, _ZEN3_OWN_GEMM)
    # from batch 64: B64 at H64 / 128 / 256 read 0.96 / 0.96 / 0.96x in A/B (sweeps: B64 H64 0.74-0.97x, B64 H512
    # 0.93-0.96x); B32-48 H64 1.01-1.04x
    Rule("rnn_cell", F32, AVX2, training=True, batch=(64, INF),
         source=_ZEN3 + "; " + _ZEN3_OWN_GEMM + "; " + _ZEN3_SETTLED),
    # training at batch 1: a step is mostly autograd's bookkeeping on either side, and seqfast's one-op step gained
    # nothing over torch's three ops (A/B, rules off, 9 rounds: H64 / 128 / 256 / 512 1.01 / 0.97 / 1.05 / 0.86x;
    # batch 8 1.09-1.41x, batch 32 1.07-1.14x; sweep-cpu-20261206-074108: B1 H64 0.81x). The module's C++ call runs
    # torch's op there without the Python dispatch.
    Rule("rnn_cell", F32, AVX2, training=True, batch=(1, 1), source=_ZEN3_B1_RNN_CELL),
    # and the same step as a one-step RNN layer (T1 B1 H512 training read 0.92-0.97x in sweeps 080824 to 112555; A/B,
    # 21 rounds, torch / seqfast's kernel at H128 / 256 / 512 / 1024: 0.93 / 0.94 / 0.81 / 0.88x, torch's op through
    # seqfast 0.99-1.12x; two steps and more: 1.15x at T2, 1.45x at T4, 2.7-4.1x at T32 in the sweeps)
    Rule("rnn", F32, AVX2, training=True, batch=(1, 1), steps=(1, 1), source=_ZEN3_B1_RNN_LAYER),
    # bfloat16 training at batch 1 up to hidden 128: as in float32, autograd's bookkeeping is most of the step, and
    # seqfast's Python around its float32 kernels (the weights read in place) cost more than the kernels saved
    # (sweeps 180155 to 205719, B1 H128: 0.98 / 1.05 / 0.99 / 0.92x). Same-process A/B, 41 rounds, torch's time over
    # seqfast's kernel's / over torch's op run by the module's C++ call under this rule: H64 0.95-1.06x / 1.11-1.18x,
    # H128 0.90-0.94x / 1.01-1.08x; at H256 the kernel 1.34x (the rule 1.04x), at B2-B8 the kernel 1.11-1.28x.
    Rule("rnn_cell", BF16, AVX2, training=True, batch=(1, 1), hidden=(1, 128), source=_ZEN3_BF16_RNN_CELL),
    Rule("lstm_cell", F32, AVX2, training=True, batch=(256, INF), hidden=(256, INF), source=_ZEN3),  # 0.85-0.93x
    # training from batch 32 at hidden >= 512 (was: every batch at hidden >= 1024, and from batch 16 at 512, where
    # B16 / 32 / 64 / 128 at H512 read 0.92 / 0.84 / 0.87 / 0.84x, _ZEN3_SETTLED). With the backward's small-batch
    # weight gradients and 33-64-row products on the own AVX2 kernel (commit 87c9f01), torch / seqfast with the rule
    # table off (_ZEN3_BACKWARD): B4 / 8 / 16 at H1024 1.33 / 1.14 / 1.25x (B8 1.10x / 1.43x in two plain pairs),
    # B16 / 24 at H512 1.19 / 1.14x, B16 H768 1.27x, B8 H2048 1.15x; B32 H512 1.02x, B64 H512 0.99x, B64 H1024 1.01x
    # (ties: torch's op keeps them)
    Rule("lstm_cell", F32, AVX2, training=True, batch=(32, INF), hidden=(512, INF),
         source=_ZEN3_SETTLED + "; " + _ZEN3_BACKWARD),
    # and batch 1 at hidden >= 1024, a memory-bound step (32 MB of weights read twice and their gradients written)
    # where torch's time swung 12-27 ms between runs: seqfast read 0.84x / 0.88x against its fast runs and 1.42-2.01x
    # against its slow ones (B2 / B4 at H1024 1.24x / 1.32x, B1 H768 1.02x, in plain torch / seqfast pairs)
    Rule("lstm_cell", F32, AVX2, training=True, batch=(1, 1), hidden=(1024, INF), source=_ZEN3_BACKWARD),
    # training at hidden >= 512 and batch >= 128 (was every batch; with the own AVX2 GEMMs seqfast's cell read 1.12x /
    # 1.01x at B1 H512, 1.14x at B8 H512, 1.07x at B64 H1024, 0.83x at B256 H1024). The inference rule at batch >=
    # 256, hidden >= 512 (0.81x) is gone: 1.10x at B256 H512, 1.03x at B256 H1024 now.
    Rule("gru_cell", F32, AVX2, training=True, batch=(128, INF), hidden=(512, INF),
         source=_ZEN3_LATER + "; " + _ZEN3_OWN_GEMM),
    # and from batch 64 at hidden >= 1024: B64 H1024 training read below 1.0x in 9 of the 10 sweeps of
    # 2026-12-05 (0.75-0.97x; 1.05x once), most recently 0.83x in sweep-cpu-20261205-061836
    Rule("gru_cell", F32, AVX2, training=True, batch=(64, INF), hidden=(1024, INF),
         source="make bench-sweep runs sweep-cpu-20261205-001425 to -061836 on the same AMD EPYC family 25 model 1"),
    # training from batch 32 at hidden >= 256 (was batch 8, where the sweep read 0.77-0.94x; with the fused AVX2 step
    # seqfast read 1.14x / 1.16x at B8 H256 / H1024 and 1.02x / 1.00x at B32 H512 / B64 H256, _ZEN3_STEP)
    Rule("lstm", F32, AVX2, training=True, batch=(32, INF), hidden=(256, INF), source=_ZEN3 + "; " + _ZEN3_STEP),
    # and from batch 8 at hidden 256-767: T32 B8 H512 training read 0.92x / 0.89x in the full sweeps -061836 / -081522
    # (1.25x alone). The A/B figures above ran in a fresh process where torch's and seqfast's multi-megabyte buffers
    # page-faulted on every call; with glibc's malloc kept from returning memory (MALLOC_MMAP_THRESHOLD_ /
    # MALLOC_TRIM_THRESHOLD_ at 4 GB, a long-running process's steady state) B8 H256 read 0.93x, B8 H512 1.00x, B16
    # H512 1.04x and B8 H1024 1.14x (_ZEN3_MALLOC).
    Rule("lstm", F32, AVX2, training=True, batch=(8, 31), hidden=(256, 767), source=_ZEN3_MALLOC),
    # inference from batch 64 at hidden >= 512 (was batch >= 32, hidden >= 256): with the fused AVX2 step
    # (_ZEN3_STEP) B32 H256 / B32 H1024 read 1.34 / 1.17x and B256 H256 (the loop's packed GEMM) 1.07x, but B64 H512
    # 1.08x at T32 and 0.93 / 0.95x at T64 (make bench cpu-20261205-053214, without the rule: 0.94x). From 16 steps
    # only: shorter sequences (a decoder's one-step calls) ran faster on seqfast's GEMM loop (_ZEN3_SHORT, torch /
    # seqfast without the rule: B64 H512 T1 / T4 / T8 / T16 / T32 2.58 / 1.34 / 1.32 / 1.02 / 1.01x; B128 H512 T1 /
    # T2 / T4 / T8 / T32 1.16 / 1.11 / 1.00 / 1.04 / 0.93x; B256 H512 T1 / T4 / T32 1.07 / 1.02 / 0.96x; B64 H1024 T1
    # / T4 / T8 / T32 1.20 / 1.46 / 1.24 / 1.02x).
    Rule("lstm", F32, AVX2, training=False, batch=(64, INF), hidden=(512, INF), steps=(16, INF),
         source=_ZEN3_STEP + "; " + _ZEN3_SHORT),
    # The rule's history: at batch >= 8, hidden >= 256 (was batch >= 32, hidden >= 1024 from the first sweep): torch's oneDNN
    # LSTM was the faster one in most runs of that region (sweeps 194326 / 201033 / 214300: B32 H256 0.74x / 0.78x;
    # make bench cpu-20261204-200307 / 214050, T64: B8 H512 0.93x / 0.82x, B64 H512 0.85x / 0.88x, B8 H256 two
    # layers / bidirectional 0.90-0.96x), though not in all (sweep 214300: B64 H512 1.20x, B8 H512 1.03x)
    # Narrowed to batch >= 32 with the own AVX2 GEMMs (_ZEN3_OWN_GEMM): B8 H256 1.40x, B8 H512 1.23x, B16 H1024
    # 1.43x for seqfast; B32 H256 0.92x, B32 H512 0.96x, B64 H512 0.71x.
    # (a rule for inference at batch >= 64, hidden <= 64 (0.68x) is gone: 1.45x at B64 H64, 1.09x at B256 H64 with the
    # own AVX2 GEMMs, _ZEN3_OWN_GEMM)
    # SDPA (batch = query length >= 2; hidden = key length). Training runs the AVX2 forward and backward blocks
    # (attention/attention_avx2.h) and wins from 129 query rows (_ZEN3_ATTN, 8 heads, torch / seqfast: causal
    # L192-2048 1.22-1.79x, non-causal L256-512 at head dim 64-128 1.07-1.18x); at 2-128 rows the fixed costs decide
    # (L8-64 0.71-0.96x, L128 0.98-1.18x) and torch's op runs. (With the BLAS backward: non-causal 0.34-0.80x, causal
    # 0.64-1.28x, _ZEN3.)
    Rule("sdpa", F32, AVX2, training=True, batch=(2, 128), source=_ZEN3 + "; " + _ZEN3_ATTN),
    # Inference runs the AVX2 forward block (attention/attention_avx2.h) from 65 query rows (_ZEN3_ATTN, 8 heads,
    # torch / seqfast: causal L128-2048 at head dim 64-128 1.15-1.81x; non-causal 1.06-1.18x up to head dim 64,
    # 1.00-1.15x at 96). Non-causal at head dim 128 read 0.91-0.96x and went to torch until the forward's tasks were
    # shared by the team (_ZEN3_SHARED, batch 1, 8 heads, non-causal: head dim 128 at L128-512 1.11-1.21x, L1024
    # 0.99-1.01x; head dim 96 at L256-512 1.07-1.22x). At 2-64 query rows both take tens of microseconds and the
    # fixed costs decide: 0.75-1.16x, torch's op runs. (Before the AVX2 block: causal inference read 0.59-0.94x,
    # 1.23x once, _ZEN3_SETTLED; non-causal 0.34-0.80x.)
    Rule("sdpa", F32, AVX2, training=False, batch=(2, 64), source=_ZEN3_ATTN),
    # bfloat16 inference: seqfast's bfloat16 forward ran 0.63-0.84x (its GEMMs emulated; training 3.0-7.7x, _ZEN3).
    # Where the float32 rules above keep seqfast's kernel, the call upcasts instead (sdpa_upcasts_bfloat16); this rule
    # sends the rest to torch's op.
    Rule("sdpa", BF16, AVX2, training=False, batch=(2, INF), source=_ZEN3),
    # Non-causal at head dim above 64 the float32 kernel on upcast copies read 0.75-1.20x torch's bfloat16 op
    # (_ZEN3_SHARED, runs of 21-31 rounds: L512 D128 0.75x / 0.91x / 1.07x, L256 D128 0.54x / 1.05x / 1.03x, L1024
    # D128 0.99x, L512 D96 1.20x / 1.15x): no better than torch's, so torch's bfloat16 op keeps those calls, as before
    # the float32 table gave head dim 128 to seqfast's kernel.
    Rule("sdpa_upcast", BF16, AVX2, training=False, batch=(2, INF), causal=False, head_dim=(65, INF),
         source=_ZEN3_SHARED),
    # the decoder step (query length 1): float32 training over 256 keys and fewer (its backward is the generic one:
    # 0.71x at batch 1 x 8 heads x 16 keys, 0.86x at 256 keys, 0.91x at batch 16 x 64 keys; 1.08x / 1.16x at batch
    # 16 x 256 / 1024 keys, _ZEN3_DECODE). Inference has no rule since the AVX2 decode kernel
    # (attention/attention_decode_avx2.h) and the no-mask fast path of seqfast.functional.scaled_dot_product_attention:
    # 1.01-1.38x at batch 1 (8 heads, 16-1024 keys) and 1.7-2.1x at batch 16-64 (_ZEN3_DECODE); before them, float32
    # over 256 keys and fewer went to torch's op (0.94x, _ZEN3)
    Rule("sdpa", F32, AVX2, training=True, batch=(1, 1), hidden=(1, 256), source=_ZEN3_DECODE),
]


@functools.lru_cache(maxsize=4096)
def _lookup(family, dtype, training, batch, hidden, causal=False, head_dim=0, steps=None):
    cpu = cpu_class()
    return any(rule.matches(family, dtype, cpu, training, batch, hidden, causal, head_dim, steps) for rule in RULES)


def _covered_here():
    """{(family, dtype, training)} some rule of RULES covers on this CPU class: a call outside it is decided by one
    set lookup (this runs on every decoder step)."""
    cpu = cpu_class()
    return frozenset((r.family, r.dtype, training) for r in RULES if cpu in r.cpus
                     for training in (False, True) if r.training is None or r.training == training)


_covered = None


epoch = 0  # bumped by set_rules: what was derived from the table before (seqfast/nn/rnn.py's plans) is stale


def set_rules(rules):
    """Replaces the rule table (tests install their own) and clears the memos built from it."""
    global RULES, _covered, epoch
    RULES = list(rules)
    _covered = None
    epoch += 1
    _lookup.cache_clear()
    from . import _ext
    module = _ext.module()
    if module is not None:
        module.rules_changed()  # the C++ module calls built from the old table decline from now on


def sdpa_torch_regions(training):
    """The table's SDPA regions on this CPU for ``training`` calls, for seqfast._C.SdpaCall (which runs torch's op
    for the calls inside them): (dtype, query length low, high, key length low, high, head dim low, high, causal: 1 /
    0 / -1 either), bounds inclusive."""
    cpu = cpu_class()
    return [(r.dtype, *(r.batch or (0, INF)), *(r.hidden or (0, INF)), *(r.head_dim or (0, INF)),
             -1 if r.causal is None else int(r.causal))
            for r in RULES if r.family == "sdpa" and cpu in r.cpus and r.training in (None, training)]


def sdpa_declined_regions():
    """The regions, in sdpa_torch_regions' form, of the calls without gradients that seqfast._C.SdpaCall leaves to the
    Python path (checked before the table's): on a CPU whose bfloat16 SDPA may upcast (sdpa_upcasts_bfloat16), every
    bfloat16 call from the query rows it may upcast (sdpa_float32_bfloat16_min_rows), where that path decides between
    the upcast and torch's op."""
    if sdpa_float32_bfloat16_min_rows() < INF:
        return [(BF16, sdpa_float32_bfloat16_min_rows(), INF, 0, INF, 0, INF, -1)]
    return []


def _sequence_rules(family, dtype, training, hidden):
    """The rules of this CPU class for ``family`` (not SDPA) in ``dtype`` on the ``training`` side whose hidden bound
    holds for ``hidden`` (their batch and steps bounds left to the caller)."""
    cpu = cpu_class()
    return [r for r in RULES if r.matches(family, dtype, cpu, training, r.batches(hidden)[0], hidden, False)]


def torch_batches(family, dtype, training, hidden):
    """The inclusive batch ranges [(low, high)] where the table prefers torch's op for cell ``family`` in ``dtype`` at
    ``hidden`` on this CPU: prefer_torch_when(family, t, batch, hidden, training) is True exactly for a batch inside
    one of them, when nothing bypasses the table (for seqfast._C.CellCall)."""
    return [r.batches(hidden) for r in _sequence_rules(family, dtype, training, hidden)]


def torch_regions(family, dtype, training, hidden):
    """The inclusive (batch low, high, steps low, high) regions where the table prefers torch's op for ``family`` (a
    sequence) in ``dtype`` at ``hidden`` on this CPU, on the ``training`` side: seqfast._C.ModuleCall runs torch's op
    there (prefer_torch_when(family, t, batch, hidden, training, steps=steps) is True exactly inside them, when
    nothing bypasses the table)."""
    return [(*r.batches(hidden), *(r.steps or (0, INF))) for r in _sequence_rules(family, dtype, training, hidden)]


def covers(family, dtype, training):
    """Whether some rule for this CPU class covers ``family`` in ``dtype`` on the ``training`` side: where not,
    prefer_torch is False whatever the shapes (a caller can skip reading them)."""
    global _covered
    if _covered is None:
        _covered = _covered_here()
    return (family, dtype, training) in _covered


def prefer_torch(family, tensor, batch, hidden, grad_tensors, causal=False, head_dim=0, steps=None):
    """Whether torch's own op is the faster choice for this call: CPU tensors, no backend forced, not while
    torch.compile traces (the graph keeps seqfast's ops), and a rule matches (memoised per shape). For "sdpa",
    ``batch`` is the query length, ``hidden`` the key length and ``head_dim`` the query's head dim; for a sequence,
    ``steps`` its time steps. The call trains (a rule's ``training`` side) when grad mode is on and one of
    ``grad_tensors`` (an iterable, read only in grad mode; None entries skipped) requires grad."""
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_tensors)
    return prefer_torch_when(family, tensor, batch, hidden, training, causal, head_dim, steps)


def prefer_torch_when(family, tensor, batch, hidden, training, causal=False, head_dim=0, steps=None):
    """:func:`prefer_torch` for a caller that knows whether the call trains."""
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace the CPU feature queries behind covers()
        return False
    dtype = tensor.dtype
    if not covers(family, dtype, training) or not tensor.is_cpu:
        return False  # the common case
    if _backend.forced_backend() is not None:
        return False
    return _lookup(family, dtype, training, batch, hidden, causal, head_dim, steps)


# bfloat16 on a CPU without native bfloat16 (classes "avx2" and "avx512": no AVX512_BF16 / AMX). torch's bfloat16
# GEMMs run emulated there (~20x slower than float32 on a Zen 3), and so do seqfast's bfloat16 RNN paths, which call
# them. The RNN layers and cells then compute in float32 on upcast copies, with the results rounded to bfloat16 once
# (torch rounds after every op: the float32 path is the more accurate of the two). The copies cost about a read and
# a write of every weight per call, which a call earns back once it does enough multiply-adds per weight: a
# batch-1 step reads each weight once, and copying it costs more than torch's emulated GEMV (A/B in the commit
# that added this).
UPCAST_BF16_MIN_ROWS = 8
_UPCAST_BF16_CPUS = ("avx2", "avx512")


# bfloat16 on a CPU with AVX512_BF16 and no AMX (measured on a Zen 5, _ZEN5_FLOAT32_BF16): torch runs native bfloat16
# kernels there (oneDNN's LSTM, bfloat16 GEMMs at about twice the float32 rate), yet seqfast's float32 kernels, fed
# float32 activations with the bfloat16 weights read in place (up to BF16_IN_PLACE_MAX_ROWS rows) or upcast copies,
# beat them wherever a call is too small for the GEMM rate to decide: torch's bfloat16 ops carry tens of microseconds
# of fixed costs per call (a bfloat16 LSTMCell step at batch 1, hidden 128: 43 us; seqfast's float32 one: 14 us). torch's
# time over seqfast's, the float32 path / seqfast's bfloat16 path or torch's op by rule (same process, 9 rounds):
#   cells (inference; training): B1 H128-1024 2.3-5.1x; 1.2-2.5x, B8 H64-256 1.2-2.9x; 1.2-2.0x, B32 H128 1.06x; 1.21x,
#     B64 H64-128 1.12-1.26x; 1.10-1.60x, B256 H64 1.21-1.39x; 1.19-1.27x -- against B8 H512 0.91x / 0.85x, B32 H256
#     0.96x / 0.97x, B64 H256 0.75x / 0.79x, B256 H128 0.81x / 0.98x: the float32 path up to batch x hidden^2 = 2^20
#     (the modules' no-grad steps past the in-place rows run the fused bfloat16 step instead of upcast copies, 2.5-3.5x
#     torch at B17-256 H64-181: csrc/rnn/rnn_module_call.cpp, fused_bf16_step);
#   one-step layer calls: T1 B1 H512 2.95-7.31x inference, 1.25-4.47x training; T1 B8 H128 2.92-3.49x, 1.32-1.67x
#     (the fused bfloat16 steps there: GRU T1 B1 H512 0.88x, RNN 1.42x, LSTM 3.10x; T1 B8 H128 1.98-2.67x);
#   sequences of 2+ steps: the float32 path on upcast copies read 1.1-7x at small batch x hidden (GRU T32 B8 H64
#     6.95x, RNN B8 H128 5.99x, LSTM B1 H128 1.14x), but the fused bfloat16 steps (csrc/rnn/rnn_sequence_step_bf16.h)
#     read more everywhere measured (_ZEN5_GRU_BF16; step / float32 path): GRU T32 B8 H64 14.5x / 7.0x, B32 H128
#     4.36x / 2.06x, B1 H256 8.48x / 4.27x, RNN T32 B8 H128 18.1x / 5.65x, B1 H512 6.78x / 2.74x, LSTM T32 B1 H128
#     3.27x / 1.19x, and at 16 rows and fewer (the float32 path's cell steps) LSTM T4 B1 H512 2.30x / 2.31x, RNN T4
#     B1 H512 3.56x / 2.56x, T8 B2 H256 9.68x / 2.88x, GRU T16 B1 H128 9.75x / 3.45x. So those calls take no upcast
#     copies here, and cell steps only when autograd records them (GRU T4 B1 H512 training 0.93x / the step's 0.51x;
#     training T32 B1 H256 3.16x / 3.06x);
#   SDPA without gradients from 128 query rows: L128-2048, head dim 64-128, causal or not, 2.2-4.3x / 1.0-1.5x.
# On an AMX CPU (class "amx"; measured on an Intel Xeon, family 6 model 167, _XEON_AMX_FLOAT32) torch's bfloat16 GEMMs
# run on tiles, yet its bfloat16 cell ops carry the same fixed costs (a bfloat16 LSTMCell step at batch 1, hidden 128:
# 72-86 us), and the float32 path read, torch's time over seqfast's, cells (inference; training) B1 H128-1024
# 1.9-6.2x; 1.2-2.5x, B8 H64-256 1.4-3.5x; 1.1-2.0x, B32-64 H64-128 1.5-1.9x; 0.87-1.43x, B256 H64 1.4-1.6x; 0.92-0.96x,
# one-step layers T1 B1 H512 3.7-5.9x; 1.3-2.6x, T1 B8 H128 3.0-4.0x; 1.4-2.0x. Past the same bound the fused
# bfloat16 cell step lost to torch's AMX GEMMs (LSTMCell B32 H512 0.46x, GRUCell B64 H512 0.39x, RNNCell B64 H1024
# 0.29x): on that class cells past the bound run torch's op (fused_bf16_cells_past_float32). The float32 SDPA on
# upcast copies stays off there (torch's bfloat16 attention on tiles: see the "sdpa" rules).
FLOAT32_BF16_WORK = 1 << 20
FLOAT32_BF16_SDPA_MIN_ROWS = 128
_FLOAT32_BF16_CPUS = ("avx512_bf16", "amx")
_FLOAT32_BF16_SDPA_CPUS = ("avx512_bf16",)
_XEON_AMX_FLOAT32 = ("same-process, torch / seqfast interleaved, 3-5 rounds, make bench-sweep's bfloat16 RNN cases, with "
                     "and without the table's bfloat16 rules, on an Intel Xeon family 6 model 167 (AMX), 2026-12-08")


def fused_bf16_cells_past_float32():
    """Whether a bfloat16 cell step past float32_bfloat16_max_batch's bound runs the fused bfloat16 step (where it
    runs; else torch's op): not on an AMX CPU (see FLOAT32_BF16_WORK)."""
    return cpu_class() != "amx"
_ZEN5_FLOAT32_BF16 = ("same-process A/B, torch / seqfast / seqfast with the float32 paths, 9 rounds, the sweep's "
                      "bfloat16 cases, on commit c28b2bf, AMD EPYC family 26 model 2")


def float32_bfloat16_max_batch(family, hidden, steps=1):
    """The largest batch of a bfloat16 call of ``family`` ("lstm", "gru", "rnn" with ``steps`` time steps, or a cell
    family) at ``hidden`` that seqfast computes in float32 on this CPU (see FLOAT32_BF16_WORK): any batch on a CPU
    without native bfloat16, the measured bounds on one with AVX512_BF16 and no AMX, else 0 (and while torch.compile
    traces: Dynamo cannot trace the CPU feature queries)."""
    if torch.compiler.is_compiling():
        return 0
    cpu = cpu_class()
    if cpu in _UPCAST_BF16_CPUS:
        return INF
    if cpu not in _FLOAT32_BF16_CPUS:
        return 0
    return FLOAT32_BF16_WORK // max(1, hidden * hidden)


def float32_bfloat16_regions(family, hidden):
    """float32_bfloat16_max_batch as inclusive (batch low, high, steps low, high) regions for an RNN module's calls,
    for seqfast._C.ModuleCall, with the upcast_min_rows it gets: where the regions of 2+ steps take no upcast copies
    (upcast_bfloat16), only the cell steps of up to BF16_IN_PLACE_MAX_ROWS rows run in them."""
    regions = [(1, float32_bfloat16_max_batch(family, hidden, 1), 1, 1),
               (1, float32_bfloat16_max_batch(family, hidden, 2), 2, INF)]
    return [r for r in regions if r[1] >= 1]


def sdpa_float32_bfloat16_min_rows():
    """The fewest query rows of a bfloat16 SDPA call without gradients that may run in float32 on upcast copies on
    this CPU (sdpa_upcasts_bfloat16): 2 without native bfloat16, FLOAT32_BF16_SDPA_MIN_ROWS with AVX512_BF16 and no
    AMX, else none (INF; also while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return INF
    cpu = cpu_class()
    if cpu in _UPCAST_BF16_CPUS:
        return 2
    return FLOAT32_BF16_SDPA_MIN_ROWS if cpu in _FLOAT32_BF16_SDPA_CPUS else INF


def upcast_bfloat16(tensors, rows, family, batch, hidden, steps=1):
    """Whether a bfloat16 call runs in float32 on upcast copies (see UPCAST_BF16_MIN_ROWS): every tensor given (None
    entries skipped) a bfloat16 CPU tensor, ``rows`` (the multiply-adds per weight: batch, or steps x batch) at least
    the minimum, this CPU without native bfloat16 or the call inside float32_bfloat16_max_batch's bounds (``family``,
    ``batch``, ``hidden``, ``steps``) and not a sequence of 2+ steps (those have the fused bfloat16 steps there), no
    backend forced, no autocast, not while torch.compile traces."""
    return (rows >= UPCAST_BF16_MIN_ROWS and batch <= float32_bfloat16_max_batch(family, hidden, steps)
            and (steps == 1 or float32_sequences()) and _float32_bfloat16(tensors))


def float32_sequences():
    """Whether bfloat16 sequences of 2+ steps compute in float32 here (on upcast copies, or without gradients as cell
    steps): on a CPU without native bfloat16. Where bfloat16 is native the fused bfloat16 steps take those calls (see
    FLOAT32_BF16_WORK), and only cell steps with gradients stay in float32."""
    return cpu_class() in _UPCAST_BF16_CPUS


def sdpa_upcasts_bfloat16(query, key, value, causal):
    """Whether a bfloat16 SDPA call without gradients (query length >= 2) runs in float32 on upcast copies, its output
    rounded to bfloat16 once: on a CPU without native bfloat16 (the conditions of upcast_bfloat16), where the float32
    call would run seqfast's kernel (no float32 rule prefers torch's op for its shape). There, seqfast's bfloat16
    forward and torch's both run emulated bfloat16 GEMMs, while the float32 blocks run at the float32 rate and the
    copies cost a read and a write of q, k and v. Same process, Zen 3, 8 heads, torch's bfloat16 op / float32
    kernel on copies made per call: L128 D64 1.28x (non-causal), 1.63x (causal); L256 D64 1.17x; L512 D64 causal
    1.94x; L256 D128 causal 1.06x. Where the float32 table prefers torch's op (up to 64 query rows, non-causal head
    dim 128), torch's float32 op lost to its bfloat16 one (L64 D64 causal 0.70x, L512 D128 0.75x): those keep
    torch's bfloat16 op, as do the "sdpa_upcast" rules' regions (seqfast's float32 kernel there no better than torch's
    bfloat16 op)."""
    L = query.shape[-2]
    if L < 2 or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return False
    if L < sdpa_float32_bfloat16_min_rows() or not _float32_bfloat16((query, key, value)):
        return False
    S, D = key.shape[-2], query.shape[-1]
    return not (_lookup("sdpa", torch.float32, False, L, S, causal, D)
                or _lookup("sdpa_upcast", torch.bfloat16, False, L, S, causal, D))


# Cell steps of 1 to this many rows instead run the float32 cell kernels on float32 copies of their activations and
# biases, with the bfloat16 weights read in place (csrc/cpu/bf16_weight_gemv.h). Same process, Zen 3, 2 threads,
# torch / seqfast: LSTMCell B8 H512 inference 0.82x upcast against 5.21x in place, B16 H512 0.79x / 5.78x, B8 H128
# 2.23x / 5.01x, GRUCell B16 H1024 3.00x / 4.64x, LSTMCell B8 H512 training 2.03x / 3.61x, B16 H256 2.61x / 2.67x;
# at batch 1 the in-place step read 2.4-3.3x in inference and 1.0-2.5x in training (H128-1024), where torch's op
# ran before. 16 is the most rows the kernels take (their row pointers live on the stack).
BF16_IN_PLACE_MAX_ROWS = 16


def bf16_weights_in_place(tensors, rows, family, batch, hidden, steps=1):
    """Whether a bfloat16 cell step of 1 to BF16_IN_PLACE_MAX_ROWS ``rows`` reads its weights in place (see there;
    the rest of the conditions as upcast_bfloat16)."""
    return (0 < rows <= BF16_IN_PLACE_MAX_ROWS and batch <= float32_bfloat16_max_batch(family, hidden, steps)
            and _float32_bfloat16(tensors))


def _float32_bfloat16(tensors):
    if torch.compiler.is_compiling():
        return False
    if _backend.forced_backend() is not None or torch._C._is_any_autocast_enabled():
        return False
    return all(t is None or (t.dtype is torch.bfloat16 and t.is_cpu) for t in tensors)
