"""Smoke test of an installed seqfast wheel, run by tests/test_wheel.py from a directory outside the repository:
the package must come from the environment it was installed into, with its compiled extension loaded."""
import os
import sys
import warnings

import torch

import seqfast
import seqfast._ext

repo = os.environ.get("SEQFAST_REPO")
where = os.path.realpath(seqfast.__file__)
print("seqfast", seqfast.__version__, "from", where, "torch", torch.__version__)
if repo:
    assert not where.startswith(os.path.realpath(repo) + os.sep), f"seqfast imported from the source tree: {where}"
assert os.path.realpath(sys.prefix) in where, f"seqfast not from this environment ({sys.prefix}): {where}"

with warnings.catch_warnings():
    warnings.simplefilter("error")  # the missing-extension fallback warns: make it fail here
    assert seqfast._ext.available(), "the C++ extension seqfast._C did not load"

cell = seqfast.nn.LSTMCell(8, 16)
x = torch.randn(2, 8, requires_grad=True)
h, c = cell(x)
assert h.shape == c.shape == (2, 16)
ref_h, ref_c = torch.nn.LSTMCell.forward(cell, x)
torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)
(h.sum() + c.sum()).backward()
assert x.grad is not None and cell.weight_ih.grad is not None

lstm = seqfast.nn.LSTM(8, 16, batch_first=True)
out, _ = lstm(torch.randn(2, 5, 8))
assert out.shape == (2, 5, 16)
model = seqfast.replace_modules(torch.nn.Sequential(torch.nn.GRU(4, 4)))
assert type(model[0]) is seqfast.nn.GRU
print("wheel smoke OK")
