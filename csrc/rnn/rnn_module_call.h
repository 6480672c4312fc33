// seqfast._C.ModuleCall (rnn_module_call.cpp): a seqfast nn.LSTM / GRU / RNN module's no-grad forward, and the checks
// that decide whether it may run, in one Python call. Built by seqfast/nn/rnn.py from the module's parameters and
// the rule table; it returns None wherever the module's regular path must decide (grad mode, autocast, another
// dtype or device, a replaced parameter, a batch the rule table gives to torch's op, a changed rule table, ...).
#pragma once

#include <pybind11/pybind11.h>

namespace seqfast {

// Adds ModuleCall and rules_changed() to the extension module.
void bind_module_call(pybind11::module_& m);

}  // namespace seqfast
