"""The one-call no-grad forward of seqfast.nn.LSTM / GRU / RNN (seqfast._C.rnn_module_inference, taken by
_SeqfastRNNMixin._inference_call): torch's outputs on every module option, and the regular path (with torch's
errors) wherever the call needs more than that path gives."""
import pytest
import torch

import seqfast
from conftest import assert_raises_like_torch
from seqfast import _ext

pytestmark = pytest.mark.skipif(_ext.module() is None or not _ext.module().rnn_kernels_supported(),
                                reason="seqfast._C not built or its RNN kernels do not run on this CPU")

KINDS = [("LSTM", {}), ("GRU", {}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"})]


def _pair(kind, kw, dtype=torch.float32, **options):
    ref = getattr(torch.nn, kind)(5, 7, **kw, **options).to(dtype)
    mod = getattr(seqfast.nn, kind)(5, 7, **kw, **options).to(dtype)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def _flat(result):
    out, states = result
    return [out] + (list(states) if isinstance(states, tuple) else [states])


@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True), (3, False)])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 5), (1, 1, 5), (6, 5)])  # the last is unbatched
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch(kind, kw, num_layers, bidirectional, batch_first, bias, shape, dtype):
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw, dtype, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                     bias=bias)
    x = torch.randn(shape, dtype=dtype)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert mod._inference_call(x) is not None  # the one-call path serves this case
            got, want = _flat(mod(x)), _flat(ref(x))
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_regular_path_where_the_call_needs_more():
    torch.manual_seed(0)
    ref, mod = _pair("LSTM", {}, num_layers=2, dropout=0.5)
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        assert mod._inference_call(x) is None  # training with dropout: masks to draw
        mod.eval()
        assert mod._inference_call(x) is not None
        with seqfast.use_backend("reference"):
            assert mod._inference_call(x) is None  # a forced backend
        assert mod._inference_call(x.to(torch.float16)) is None
    assert mod._inference_call(x) is not None  # (forward asks only without grad; the helper itself does not look)
    projected = seqfast.nn.LSTM(5, 7, proj_size=3).eval()
    with torch.no_grad():
        assert projected._inference_call(x) is None


def test_plan_follows_the_parameters():
    torch.manual_seed(0)
    ref, mod = _pair("GRU", {})
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(mod(x)[0], ref(x)[0])
        # a replaced parameter (new object) and a dtype change in place (.to keeps the Parameter objects)
        new = torch.nn.Parameter(torch.randn_like(mod.weight_hh_l0))
        mod.weight_hh_l0 = new
        ref.weight_hh_l0 = torch.nn.Parameter(new.detach().clone())
        torch.testing.assert_close(mod(x)[0], ref(x)[0])
        mod.double()
        ref.double()
        torch.testing.assert_close(mod(x.double())[0], ref(x.double())[0])


@pytest.mark.parametrize("args", [(torch.randn(4, 3, 6),), (torch.randn(4, 3, 5, dtype=torch.float64),),
                                  (torch.randn(0, 3, 5),), (torch.randn(2, 3, 4, 5),)])
def test_errors_as_torch(args):
    ref, mod = _pair("LSTM", {})
    with torch.no_grad():
        assert_raises_like_torch(ref, mod, args)


def test_empty_batch_as_torch():
    ref, mod = _pair("GRU", {})
    x = torch.randn(4, 0, 5)
    with torch.no_grad():
        for g, w in zip(_flat(mod(x)), _flat(ref(x))):
            assert g.shape == w.shape
