// seqfast._C.SdpaCall (sdpa_call.cpp): an unmasked no-grad scaled_dot_product_attention on 4-D CPU tensors, and the
// checks that decide whether it may run, in one Python call. seqfast.functional.scaled_dot_product_attention asks it
// first; it returns None wherever the function's regular path must decide (grad mode, autocast, a tensor subclass,
// other ranks / shapes / dtypes, a case the rule table gives to torch's op, a changed rule table, ...).
#pragma once

#include <pybind11/pybind11.h>

namespace seqfast {

// Adds SdpaCall to the extension module.
void bind_sdpa_call(pybind11::module_& m);

}  // namespace seqfast
