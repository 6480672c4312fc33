// The Python bindings of seqfast._C. <torch/extension.h> compiles slowly: besides this file only the no-grad calls
// that read Python objects include it (rnn/rnn_module_call.cpp, attention/sdpa_call.cpp, through call_guard.h); the
// kernel files include ATen headers only.
// Every kernel binding releases the GIL: the kernels touch no Python objects, and a server's other Python threads
// keep running meanwhile.
#include <torch/extension.h>

#include "attention/attention.h"
#include "attention/sdpa_call.h"
#include "cpu/block_pool.h"
#include "cpu/config.h"
#include "cpu/gemm.h"
#include "cpu/gemv_avx512.h"
#include "cpu/isa.h"
#include "cpu/team.h"
#include "linear/linear_call.h"
#include "rnn/rnn.h"
#include "rnn/rnn_module_call.h"
#include "rnn/rnn_sequence_step_bf16.h"

namespace py = pybind11;

namespace {

py::dict config_dict() {
  const seqfast::cpu::Config& c = seqfast::cpu::config();
  py::dict d;
  d["own_gemm"] = c.own_gemm;
  d["blas_native"] = c.blas_native;
  d["fused"] = c.fused;
  d["mkl_pack"] = c.mkl_pack;
  d["avx2_lstm_step"] = c.avx2_lstm_step;
  d["avx512_attention"] = c.avx512_attention;
  d["avx2_decode"] = c.avx2_decode;
  d["avx512_nt"] = c.avx512_nt;
  d["avx512_wt"] = c.avx512_wt;
  d["avx512_gemv"] = c.avx512_gemv;
  d["avx512_pointwise"] = c.avx512_pointwise;
  d["bf16_rnn_step"] = c.bf16_rnn_step;
  d["bf16_products"] = c.bf16_products;
  d["avx2_attention"] = c.avx2_attention;
  d["avx2_pack"] = c.avx2_pack;
  d["nt_cells"] = c.nt_cells;
  d["rows_split"] = c.rows_split;
  d["par_min_work"] = c.par_min_work;
  d["small_batch"] = c.small_batch;
  d["small_batch_set"] = c.small_batch_set;
  d["step_par_min_h"] = c.step_par_min_h;
  d["pool_mb"] = c.pool_mb;
  d["max_threads"] = c.max_threads;
  d["contention_backoff"] = c.contention_backoff;
  d["block_share"] = c.block_share;
  d["share_test_delay_us"] = c.share_test_delay_us;
  return d;
}

// set_config(own_gemm=False, ...): the named fields change, the rest keep their value; returns the new config.
py::dict set_config(const py::kwargs& kw) {
  seqfast::cpu::Config c = seqfast::cpu::config();
  for (const auto& item : kw) {
    const std::string k = py::cast<std::string>(item.first);
    const py::handle v = item.second;
    if (k == "own_gemm") c.own_gemm = py::cast<bool>(v);
    else if (k == "blas_native") c.blas_native = py::cast<int64_t>(v);
    else if (k == "fused") c.fused = py::cast<bool>(v);
    else if (k == "mkl_pack") c.mkl_pack = py::cast<bool>(v);
    else if (k == "avx2_lstm_step") c.avx2_lstm_step = py::cast<bool>(v);
    else if (k == "avx512_attention") c.avx512_attention = py::cast<bool>(v);
    else if (k == "avx2_decode") c.avx2_decode = py::cast<bool>(v);
    else if (k == "avx512_nt") c.avx512_nt = py::cast<bool>(v);
    else if (k == "avx512_wt") c.avx512_wt = py::cast<bool>(v);
    else if (k == "avx512_gemv") c.avx512_gemv = py::cast<bool>(v);
    else if (k == "avx512_pointwise") c.avx512_pointwise = py::cast<bool>(v);
    else if (k == "bf16_rnn_step") c.bf16_rnn_step = py::cast<bool>(v);
    else if (k == "bf16_products") c.bf16_products = py::cast<bool>(v);
    else if (k == "avx2_attention") c.avx2_attention = py::cast<bool>(v);
    else if (k == "avx2_pack") c.avx2_pack = py::cast<bool>(v);
    else if (k == "nt_cells") c.nt_cells = py::cast<bool>(v);
    else if (k == "rows_split") c.rows_split = py::cast<bool>(v);
    else if (k == "par_min_work") c.par_min_work = py::cast<int64_t>(v);
    else if (k == "small_batch") {
      c.small_batch = py::cast<int64_t>(v);
      c.small_batch_set = true;
    } else if (k == "small_batch_set") c.small_batch_set = py::cast<bool>(v);
    else if (k == "step_par_min_h") c.step_par_min_h = py::cast<int64_t>(v);
    else if (k == "pool_mb") c.pool_mb = py::cast<int64_t>(v);
    else if (k == "max_threads") c.max_threads = py::cast<int64_t>(v);
    else if (k == "contention_backoff") c.contention_backoff = py::cast<bool>(v);
    else if (k == "block_share") c.block_share = py::cast<bool>(v);
    else if (k == "share_test_delay_us") c.share_test_delay_us = py::cast<int64_t>(v);
    else throw py::type_error("set_config() got an unexpected keyword argument '" + k + "'");
  }
  TORCH_CHECK(c.small_batch >= 0 && c.small_batch <= 16, "set_config: small_batch must be in [0, 16], got ",
              c.small_batch);
  seqfast::cpu::set_config(c);
  return config_dict();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "seqfast C++ CPU kernels";
  // The function-local statics (configuration, usable CPUs, ISA flags, the workspace pool and its fork handlers) are
  // built here, at import, on the importing thread. Built on first use instead, inside a kernel running on another
  // Python thread, one could be mid-initialisation when the process forks, and the child would wait forever on its
  // initialisation guard (tests/test_cpp_fork.py caught a child hung in usable_cpus()).
  seqfast::cpu::config();
  seqfast::cpu::usable_cpus();
  seqfast::cpu::has_avx2_fma();
  seqfast::cpu::has_avx512();
  seqfast::cpu::l2_cache_bytes();
  seqfast::cpu::l3_cache_bytes();
  seqfast::block_pool::init();
  using GIL = py::call_guard<py::gil_scoped_release>;

  // ---- configuration (cpu/config.h) and the machine ----
  m.def("get_config", &config_dict, "the kernels' configuration (read from SEQFAST_CPU_* at load) as a dict");
  m.def("set_config", &set_config, "set configuration fields by name, e.g. set_config(own_gemm=False); returns it");
  m.def("reload_config", [] {
    seqfast::cpu::reload_config();
    return config_dict();
  }, "re-read the SEQFAST_CPU_* environment variables and the usable CPU count");
  m.def("usable_cpus", &seqfast::cpu::usable_cpus, "CPUs this process may use (affinity and cgroup quota)");
  m.def("has_avx2", &seqfast::cpu::has_avx2_fma);
  m.def("has_avx512", &seqfast::cpu::has_avx512);
  m.def("cache_bytes", [] {
    return py::dict(py::arg("l2") = seqfast::cpu::l2_cache_bytes(), py::arg("l3") = seqfast::cpu::l3_cache_bytes());
  }, "the cache sizes the kernels' rules read: one core's L2, the L3 it shares (bytes)");
  m.def("_raise_in_parallel_region", &seqfast::cpu::raise_in_parallel_region, GIL(), py::arg("team"),
        "test hook: an error thrown inside a parallel region must surface as RuntimeError");

  // ---- RNN cells and sequences (rnn/rnn.h) ----
  m.def("rnn_kernels_supported", &seqfast::rnn_kernels_supported);
  m.def("bf16_cell_weights_supported", &seqfast::bf16_cell_weights_supported);
  m.def("bf16_rnn_step_available", &seqfast::step_bf16::available,
        "whether bfloat16 LSTM / GRU layers run the fused bfloat16 steps here (AVX512_BF16, no AMX, config on)");
  m.def("cell_step_fused", &seqfast::cell_step_fused, py::arg("gates"), py::arg("batch"), py::arg("input_size"),
        py::arg("hidden_size"));
  m.def("one_step_as_cell", &seqfast::one_step_as_cell, py::arg("batch"));
  m.def("sdpa_bf16_upcasts", &seqfast::sdpa_bf16_upcasts,
        "whether bfloat16 SDPA (but the forward decoder step) computes in float32 on upcast copies here");
  m.def("lstm_input_first", &seqfast::lstm_input_first, py::arg("rows"), py::arg("input_size"), py::arg("hidden_size"),
        py::arg("units"));
  m.def("lstm_step_yields", &seqfast::lstm_step_yields, py::arg("rows"), py::arg("input_size"), py::arg("hidden_size"),
        py::arg("units"));
  m.def("blas_native", &seqfast::gemm::blas_native, "whether the BLAS takes the products it runs faster here");
  // metadata only, microseconds: the GIL stays held (releasing it would cost more than the check)
  m.def("check_cell_args", &seqfast::check_cell_args, "seqfast.functional's cell checks (torch's errors)");
  // The GEMM entry point (cpu/gemm.h), bound for its parity tests.
  m.def("own_gemm_available", &seqfast::own_gemm_available);
  m.def("mm_f32", &seqfast::mm_f32, GIL(), py::arg("a"), py::arg("b"), py::arg("bias") = py::none());
  m.def("nt_gemm_available", &seqfast::nt_gemm_available);
  m.def("gemm_wt_f32", &seqfast::gemm_wt_f32, GIL(), py::arg("a"), py::arg("w"), py::arg("bias") = py::none());
  m.def("gemv_f32", &seqfast::gemv_f32, GIL(), py::arg("x1"), py::arg("w1"), py::arg("x2") = py::none(),
        py::arg("w2") = py::none(), py::arg("y") = py::none());
  m.def("gemv_avx512_available", [] { return seqfast::gemv512::available(); });
  m.def("gemm_nt_f32", &seqfast::gemm_nt_f32, GIL(), py::arg("a"), py::arg("w"), py::arg("bias") = py::none());
  m.def("gemm_ntp_f32", &seqfast::gemm_ntp_f32, GIL(), py::arg("a"), py::arg("w"), py::arg("bias") = py::none());
  m.def("gemm_nn_f32", &seqfast::gemm_nn_f32, GIL(), py::arg("a"), py::arg("b"));
  m.def("gemm_nnp_f32", &seqfast::gemm_nnp_f32, GIL(), py::arg("a"), py::arg("b"));
  m.def("lstm_cell_forward", &seqfast::lstm_cell_forward, GIL(), py::arg("x"), py::arg("hx"), py::arg("cx"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"));
  m.def("lstm_cell_backward", &seqfast::lstm_cell_backward, GIL(), py::arg("grad_hy"), py::arg("grad_cy"),
        py::arg("x"), py::arg("hx"), py::arg("cx"), py::arg("w_ih"), py::arg("w_hh"), py::arg("gates"), py::arg("cy"),
        py::arg("need_dx") = true, py::arg("need_dh") = true, py::arg("need_dw_ih") = true,
        py::arg("need_dw_hh") = true);
  m.def("gru_cell_forward", &seqfast::gru_cell_forward, GIL(), py::arg("x"), py::arg("hx"), py::arg("w_ih"),
        py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"));
  m.def("gru_cell_backward", &seqfast::gru_cell_backward, GIL(), py::arg("grad_hy"), py::arg("x"), py::arg("hx"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("ws"), py::arg("need_dx") = true, py::arg("need_dh") = true,
        py::arg("need_dw_ih") = true, py::arg("need_dw_hh") = true);
  m.def("rnn_cell_forward", &seqfast::rnn_cell_forward, GIL(), py::arg("x"), py::arg("hx"), py::arg("w_ih"),
        py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("relu"));
  m.def("rnn_cell_backward", &seqfast::rnn_cell_backward, GIL(), py::arg("grad_hy"), py::arg("x"), py::arg("hx"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("hy"), py::arg("relu"), py::arg("need_dx") = true,
        py::arg("need_dh") = true, py::arg("need_dw_ih") = true, py::arg("need_dw_hh") = true);
  m.def("lstm_layer_forward", &seqfast::lstm_layer_forward, GIL(), py::arg("x"), py::arg("batch_sizes"),
        py::arg("h0"), py::arg("c0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"),
        py::arg("reverse"));
  m.def("lstm_layer_inference", &seqfast::lstm_layer_inference, GIL(), py::arg("x"), py::arg("batch_sizes"),
        py::arg("h0"), py::arg("c0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"),
        py::arg("reverse"));
  m.def("lstm_layer_backward", &seqfast::lstm_layer_backward, GIL(), py::arg("grad_out"), py::arg("grad_hn"),
        py::arg("grad_cn"), py::arg("x"), py::arg("batch_sizes"), py::arg("h0"), py::arg("c0"), py::arg("w_ih"),
        py::arg("w_hh"), py::arg("out"), py::arg("gates"), py::arg("cs"), py::arg("reverse"),
        py::arg("need_dx") = true, py::arg("need_dw_ih") = true, py::arg("need_dw_hh") = true);
  m.def("lstm_proj_layer_forward", &seqfast::lstm_proj_layer_forward, GIL(), py::arg("x"), py::arg("batch_sizes"),
        py::arg("h0"), py::arg("c0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"),
        py::arg("w_hr"), py::arg("reverse"));
  m.def("lstm_proj_layer_backward", &seqfast::lstm_proj_layer_backward, GIL(), py::arg("grad_out"),
        py::arg("grad_hn"), py::arg("grad_cn"), py::arg("x"), py::arg("batch_sizes"), py::arg("h0"), py::arg("c0"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("w_hr"), py::arg("out"), py::arg("gates"), py::arg("cs"),
        py::arg("hs"), py::arg("reverse"), py::arg("need_dx") = true, py::arg("need_dw_ih") = true,
        py::arg("need_dw_hh") = true, py::arg("need_dw_hr") = true);
  m.def("gru_layer_forward", &seqfast::gru_layer_forward, GIL(), py::arg("x"), py::arg("batch_sizes"), py::arg("h0"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("reverse"));
  m.def("gru_layer_backward", &seqfast::gru_layer_backward, GIL(), py::arg("grad_out"), py::arg("grad_hn"),
        py::arg("x"), py::arg("batch_sizes"), py::arg("h0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("out"),
        py::arg("ws"), py::arg("reverse"), py::arg("need_dx") = true, py::arg("need_dw_ih") = true,
        py::arg("need_dw_hh") = true);
  m.def("rnn_layer_forward", &seqfast::rnn_layer_forward, GIL(), py::arg("x"), py::arg("batch_sizes"), py::arg("h0"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("relu"), py::arg("reverse"));
  m.def("rnn_module_inference", &seqfast::rnn_module_inference, GIL(), py::arg("mode"), py::arg("input"),
        py::arg("weights"), py::arg("has_biases"), py::arg("num_layers"), py::arg("bidirectional"),
        py::arg("batch_first"), py::arg("h0") = py::none(), py::arg("c0") = py::none(),
        py::arg("cell_steps") = false);
  seqfast::bind_module_call(m);
  m.def("rnn_layer_backward", &seqfast::rnn_layer_backward, GIL(), py::arg("grad_out"), py::arg("grad_hn"),
        py::arg("x"), py::arg("batch_sizes"), py::arg("h0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("out"),
        py::arg("relu"), py::arg("reverse"), py::arg("need_dx") = true, py::arg("need_dw_ih") = true,
        py::arg("need_dw_hh") = true);

  // ---- linear (linear/linear_call.h) ----
  seqfast::bind_linear(m);

  // ---- attention (attention/attention.h) ----
  seqfast::bind_sdpa_call(m);
  m.def("sdpa_forward", &seqfast::sdpa_forward, GIL(), "flash SDPA forward -> (out, lse)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("bias"), py::arg("is_causal"), py::arg("scale"));
  m.def("sdpa_backward", &seqfast::sdpa_backward, GIL(), "flash SDPA backward -> (dq, dk, dv)", py::arg("grad_out"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("bias"),
        py::arg("is_causal"), py::arg("scale"), py::arg("fold_kv") = false);
  m.def("additive_attention_forward", &seqfast::additive_attention_forward, GIL(),
        "fused Bahdanau attention step -> (context, weights)", py::arg("qp"), py::arg("kp"), py::arg("v"),
        py::arg("values"), py::arg("mask"));
  m.def("additive_attention_backward", &seqfast::additive_attention_backward, GIL(),
        "fused Bahdanau attention backward -> (dqp, dkp, dv, dvalues)", py::arg("grad_context"),
        py::arg("grad_weights"), py::arg("qp"), py::arg("kp"), py::arg("v"), py::arg("values"), py::arg("mask"),
        py::arg("weights"));
}
