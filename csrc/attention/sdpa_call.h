// seqfast._C.SdpaCall (sdpa_call.cpp): an unmasked scaled_dot_product_attention on 4-D CPU tensors, and the checks
// that decide who runs it, in one Python call. seqfast.functional.scaled_dot_product_attention asks it first. A call
// with no graph to record (grad mode off, or no input requiring grad) runs seqfast's kernel; one with gradients inside
// the rule table's training regions runs torch's op (autograd records it as usual). It returns None wherever the
// function's regular path must decide (gradients outside those regions, autocast, forward-mode AD, a tensor subclass,
// other ranks / shapes / dtypes, an inference case the rule table gives to torch's op, a changed rule table, ...).
#pragma once

#include <pybind11/pybind11.h>

namespace seqfast {

// Adds SdpaCall to the extension module.
void bind_sdpa_call(pybind11::module_& m);

}  // namespace seqfast
