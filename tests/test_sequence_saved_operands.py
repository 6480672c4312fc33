"""nn.LSTM / GRU / RNN over sequences keep for their backward what torch's layers keep (seqfast.ops.fused_op's
keep_for_backward): an in-place change of an operand torch does not save, or an input made under inference_mode,
raises nothing and gives torch's gradients. (Where torch raises, seqfast may too; torch's CPU LSTM saves its input
whatever is frozen, so it raises in cases its GRU / RNN and seqfast's layers run.)"""
import pytest
import torch

import seqfast

KINDS = ["LSTM", "GRU", "RNN"]


def _run(lib, kind, frozen, edit, inference, x_grad, h0_grad):
    torch.manual_seed(0)
    m = getattr(lib, kind)(3, 4, num_layers=2)
    for name in frozen:
        for p in m.parameters() if name == "all" else [getattr(m, name)]:
            p.requires_grad_(False)
    torch.manual_seed(1)  # the same inputs for both
    if inference:
        with torch.inference_mode():
            x = torch.randn(5, 2, 3)
    else:
        x = torch.randn(5, 2, 3, requires_grad=x_grad) * 1
    h0 = torch.randn(2, 2, 4, requires_grad=h0_grad)
    state = (h0, torch.randn(2, 2, 4)) if kind == "LSTM" else h0
    try:
        out, _ = m(x, state)  # (torch's LSTM refuses to save an inference-mode input already here)
        with torch.no_grad():
            if edit == "x":
                x.mul_(2)
            elif edit == "h0":
                h0.mul_(2)
        out.square().sum().backward()
    except RuntimeError:
        return "raised", None
    return "ok", [p.grad for p in m.parameters()] + [h0.grad]


CASES = [  # (frozen parameters, what is changed in place after the forward, x made under inference_mode, x grad,
    #         h0 grad)
    (("all",), "x", False, True, False),
    (("all",), None, True, False, True),
    (("weight_hh_l0",), "h0", False, True, False),
    (("weight_ih_l0",), None, True, False, False),
    ((), "x", False, True, False),
    ((), "h0", False, True, False),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("frozen,edit,inference,x_grad,h0_grad", CASES)
def test_saved_operands_as_torchs(kind, frozen, edit, inference, x_grad, h0_grad):
    want = _run(torch.nn, kind, frozen, edit, inference, x_grad, h0_grad)
    got = _run(seqfast.nn, kind, frozen, edit, inference, x_grad, h0_grad)
    if want[0] == "ok":
        assert got[0] == "ok"
        for a, b in zip(got[1], want[1]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", ["GRU", "RNN", "LSTM-proj", "LSTM-float64"])
def test_one_step_without_state_does_not_keep_weight_hh(kind, packed, backend):
    """A one-step sequence from a zero state: no gradient goes through a state, so torch's per-step graph keeps no
    W_hh, and changing it in place after the forward leaves the backward as it was (the layer ops keep W_hh aside
    there). torch's float32 LSTM (oneDNN) keeps it and raises, hence float64 / a projection for the LSTM here."""
    dtype = torch.float64 if kind == "LSTM-float64" else torch.float32
    name = kind.split("-")[0]
    kw = dict(proj_size=2) if kind == "LSTM-proj" else {}
    grads = []
    for lib in (torch.nn, seqfast.nn):
        torch.manual_seed(0)
        m = getattr(lib, name)(3, 4, **kw).to(dtype)
        x = torch.randn(1, 2, 3, dtype=dtype, requires_grad=True)
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([1, 1])) if packed else x
        with seqfast.use_backend(backend):
            out = m(inp)[0]
        loss = (out.data if packed else out).sum()
        with torch.no_grad():
            m.weight_hh_l0.mul_(0.5)
        grads.append(torch.autograd.grad(loss, [x, m.weight_ih_l0]))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want)
