"""LSTM / GRU over whole sequences: seqfast vs torch (oneDNN / cuDNN underneath), T 64.
Grid: batch {1, 8, 64} x hidden {128, 512} x {inference, training} for 1 layer; 2 layers and bidirectional at
batch 8; bf16 on CPU; packed input with lengths spread over 1..T against the same batch padded to T."""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import seqfast
from conftest import DEVICES

T = 64
KINDS = {"lstm": (torch.nn.LSTM, seqfast.nn.LSTM), "gru": (torch.nn.GRU, seqfast.nn.GRU)}
SHAPES = [(b, h, 1, False) for b in (1, 8, 64) for h in (128, 512)] + \
         [(8, h, 2, False) for h in (128, 512)] + [(8, h, 1, True) for h in (128, 512)]


def _rounds(batch, hidden, mode):
    return 5 if batch * hidden >= 64 * 512 and mode == "train" else None


def _case(kind, impl, hidden, layers, bidir, device, dtype=torch.float32):
    torch.manual_seed(0)
    ref_cls, ours_cls = KINDS[kind]
    ref = ref_cls(hidden, hidden, num_layers=layers, bidirectional=bidir).to(device, dtype)
    if impl == "torch":
        return ref
    ours = ours_cls(hidden, hidden, num_layers=layers, bidirectional=bidir).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    return ours


def _step(module, x, mode):
    def step():
        if mode == "infer":
            with torch.no_grad():
                return module(x)
        out = module(x)[0]
        (out.data if isinstance(out, PackedSequence) else out).float().sum().backward()
    return step


@pytest.mark.parametrize("impl", ["torch", "seqfast"])
@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-H{s[1]}-L{s[2]}{'-bidir' if s[3] else ''}")
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("device", DEVICES)
def test_sequence(timed, benchmark, device, kind, shape, mode, impl):
    batch, hidden, layers, bidir = shape
    benchmark.group = f"{kind} {device} fp32 T{T} B{batch} H{hidden} layers{layers}{' bidir' if bidir else ''} {mode}"
    module = _case(kind, impl, hidden, layers, bidir, device)
    x = torch.randn(T, batch, hidden, device=device, requires_grad=mode == "train")
    timed(_step(module, x, mode), device, _rounds(batch, hidden, mode))


@pytest.mark.parametrize("impl", ["torch", "seqfast"])
@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_sequence_bf16_cpu(timed, benchmark, kind, mode, impl):
    batch, hidden = 64, 512
    benchmark.group = f"{kind} cpu bf16 T{T} B{batch} H{hidden} layers1 {mode}"
    module = _case(kind, impl, hidden, 1, False, "cpu", torch.bfloat16)
    x = torch.randn(T, batch, hidden, dtype=torch.bfloat16, requires_grad=mode == "train")
    timed(_step(module, x, mode), "cpu", 5 if mode == "train" else None)


@pytest.mark.parametrize("impl", ["torch", "seqfast"])
@pytest.mark.parametrize("form", ["padded", "packed"])
@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_packed_vs_padded(timed, benchmark, kind, mode, form, impl):
    """The same 32 sequences (lengths spread evenly over 1..T) as a PackedSequence and padded to T. Groups compare
    torch and seqfast for each form; benchmarks/report.py also prints seqfast's packed/padded ratio."""
    batch, hidden = 32, 256
    benchmark.group = f"{kind} cpu fp32 T{T} B{batch} H{hidden} {form} lengths 1..T {mode}"
    module = _case(kind, impl, hidden, 1, False, "cpu")
    x = torch.randn(T, batch, hidden, requires_grad=mode == "train")
    lengths = torch.linspace(1, T, batch).round().long()
    if form == "packed":
        def step():
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            return _step(module, packed, mode)()
    else:
        step = _step(module, x, mode)
    timed(step, "cpu")
