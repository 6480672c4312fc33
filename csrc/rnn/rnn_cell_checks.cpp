// The argument checks of seqfast.functional's cells (lstm_cell / gru_cell / rnn_cell), with torch._VF's messages.
// They run before every cell step a decoder loop takes; in Python they cost as much as a batch-1 cell's kernel, so
// the cell functions call this one entry (seqfast/functional/_rnn_cell.py keeps the Python twin for a missing
// extension, and formats the dtype / device error as torch names dtypes). Only metadata is read: any device works.
#include "rnn/rnn.h"

#include <c10/util/Exception.h>

namespace seqfast {

namespace {

const char* cell_name(int64_t gates) { return gates == 4 ? "lstm_cell" : gates == 3 ? "gru_cell" : "rnn_cell"; }

}  // namespace

int64_t check_cell_args(int64_t gates, const at::Tensor& input, const at::Tensor& h, const OptTensor& c,
                        const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                        bool autocast) {
  const char* name = cell_name(gates);
  // sizes read in the Python twin's order: a missing dimension is an IndexError in both
  const int64_t batch = input.size(0), input_size = input.size(1);
  TORCH_CHECK(input_size == w_ih.size(1), "input has inconsistent input_size: got ", input_size, " expected ",
              w_ih.size(1));
  const int64_t hidden = w_hh.size(1);
  const at::Tensor* states[2] = {&h, c.has_value() && c->defined() ? &*c : nullptr};
  for (int i = 0; i < 2 && states[i]; ++i) {
    const at::Tensor& s = *states[i];
    TORCH_CHECK(batch == s.size(0), "Input batch size ", batch, " doesn't match hidden", i, " batch size ",
                s.size(0));
    TORCH_CHECK(s.size(1) == hidden, "hidden", i, " has inconsistent hidden_size: got ", s.size(1), ", expected ",
                hidden);
    TORCH_CHECK(s.dim() == 2, name, ": expected hidden", i, " to be 2-D, got ", s.dim(), "-D");
  }
  const int64_t rows = gates * hidden;
  if (w_ih.dim() != 2 || w_hh.dim() != 2 || w_ih.size(0) != rows || w_hh.size(0) != rows) return kCellTorchOp;
  for (const OptTensor* b : {&b_ih, &b_hh})
    if (b->has_value() && (*b)->defined() && ((*b)->dim() != 1 || (*b)->size(0) != rows)) return kCellTorchOp;
  if (autocast) return kCellOk;  // under autocast the op casts itself
  for (const at::Tensor* t : {&w_ih, &w_hh, states[0], states[1], b_ih.has_value() ? &*b_ih : nullptr,
                               b_hh.has_value() ? &*b_hh : nullptr})
    if (t && t->defined() && (t->scalar_type() != input.scalar_type() || t->device() != input.device()))
      return kCellMismatch;
  return kCellOk;
}

}  // namespace seqfast
