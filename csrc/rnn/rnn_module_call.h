// seqfast._C.ModuleCall and CellCall (rnn_module_call.cpp): a seqfast nn.LSTM / GRU / RNN module's no-grad forward,
// or one no-grad step of an LSTMCell / GRUCell / RNNCell, and the checks that decide whether it may run, in one
// Python call; also the calls autograd records where the rule table gives them to torch's op, and float32 / float64
// cell steps and one-step module calls recorded as C++ cell steps (rnn_cell_autograd.h). Built by seqfast/nn/rnn.py
// and rnn_cell.py from the module's parameters and the rule table; a call returns None wherever the module's regular
// path must decide (autocast, another dtype or device, a replaced parameter, a changed rule table, a forward-mode
// tangent, ...), and stale() says when the module should build a new one.
#pragma once

#include <pybind11/pybind11.h>

namespace seqfast {

// Adds ModuleCall, CellCall and rules_changed() to the extension module.
void bind_module_call(pybind11::module_& m);

}  // namespace seqfast
