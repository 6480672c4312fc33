"""LSTMCell / GRUCell / RNNCell: seqfast vs torch, batch {1, 64} x hidden {128, 512} (input size = hidden),
inference (no_grad) and training (forward + backward of the summed outputs)."""
import pytest
import torch

import seqfast
from conftest import DEVICES

CELLS = {"lstm": (torch.nn.LSTMCell, seqfast.nn.LSTMCell), "gru": (torch.nn.GRUCell, seqfast.nn.GRUCell),
         "rnn": (torch.nn.RNNCell, seqfast.nn.RNNCell)}


@pytest.mark.parametrize("impl", ["torch", "seqfast"])
@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("hidden", [128, 512])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("device", DEVICES)
def test_cell(timed, benchmark, device, cell, batch, hidden, mode, impl):
    benchmark.group = f"{cell}_cell {device} fp32 B{batch} H{hidden} {mode}"
    torch.manual_seed(0)
    ref_cls, ours_cls = CELLS[cell]
    module = (ref_cls if impl == "torch" else ours_cls)(hidden, hidden).to(device)
    x = torch.randn(batch, hidden, device=device, requires_grad=mode == "train")
    h = torch.randn(batch, hidden, device=device)
    state = (h, torch.randn_like(h)) if cell == "lstm" else h

    def step():
        if mode == "infer":
            with torch.no_grad():
                return module(x, state)
        out = module(x, state)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    timed(step, device)
