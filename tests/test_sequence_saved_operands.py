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
