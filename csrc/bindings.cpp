// The Python bindings of seqfast._C. This is the only translation unit that includes <torch/extension.h>
// (about a minute to compile on 2 cores); the kernel files include ATen headers only. Each kernel family keeps its
// m.def(...) lines in its own csrc/<family>_bindings.inc next to its sources.
#include <torch/extension.h>

#include "rnn.h"
#include "attention.h"
#include "sgemm_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "seqfast C++ CPU kernels";
#include "rnn_bindings.inc"
#include "attention_bindings.inc"
}
