"""seqfast.patch_torch: torch.nn.LSTM etc. build seqfast modules while active; torch is restored after."""
import importlib
import pickle
import types

import pytest
import torch
import torch.nn as nn

import seqfast
from seqfast.patching import patch_torch, twins

ORIGINALS = {cls.__name__: cls for cls in twins()}
HOMES = [torch.nn, torch.nn.modules] + [importlib.import_module(c.__module__) for c in ORIGINALS.values()]


def _all_restored():
    import torch.nn.modules.transformer as transformer
    return all(getattr(home, name) is cls for name, cls in ORIGINALS.items() for home in HOMES + [transformer]
               if hasattr(home, name))


@pytest.fixture(autouse=True)
def _restore_torch():
    assert _all_restored()
    yield
    assert _all_restored(), "a test left torch.nn patched"


# stands for a third-party module that builds its own layers through torch.nn's names
THIRD_PARTY = """
import torch
from torch import nn
import torch.nn.modules.rnn as rnn_mod

def build():
    return torch.nn.Sequential(nn.Linear(4, 4)), nn.LSTM(4, 8), torch.nn.GRUCell(8, 8), rnn_mod.RNN(4, 4)
"""


def _third_party():
    module = types.ModuleType("third_party_builder")
    exec(THIRD_PARTY, module.__dict__)
    return module


def test_context_manager_builds_seqfast_and_restores():
    lib = _third_party()
    with patch_torch() as handle:
        assert handle.active
        _, lstm, cell, rnn = lib.build()
        assert type(lstm) is seqfast.nn.LSTM and type(cell) is seqfast.nn.GRUCell and type(rnn) is seqfast.nn.RNN
        assert type(nn.modules.rnn.LSTMCell(3, 3)) is seqfast.nn.LSTMCell
        assert type(nn.RNNCell(3, 3, nonlinearity="relu")) is seqfast.nn.RNNCell
        assert type(nn.modules.GRU(3, 3, batch_first=True)) is seqfast.nn.GRU
    assert not handle.active and _all_restored()
    assert type(lib.build()[1]) is torch.nn.modules.rnn.LSTM


def test_isinstance_keeps_its_meaning():
    before = nn.LSTM(3, 4)
    with patch_torch():
        during = nn.LSTM(3, 4)
        assert isinstance(before, nn.LSTM) and isinstance(during, nn.LSTM)
        assert not isinstance(nn.GRU(3, 3), nn.LSTM)
        assert issubclass(ORIGINALS["LSTM"], nn.LSTM) and issubclass(seqfast.nn.LSTM, nn.LSTM)
        assert isinstance(during, nn.RNNBase) and isinstance(during, ORIGINALS["LSTM"])
    assert isinstance(during, nn.LSTM) and issubclass(seqfast.nn.LSTM, nn.LSTM)
    # seqfast's classes still derive from torch's originals
    for original, seq in twins().items():
        assert original in seq.__mro__


def test_plain_call_and_undo():
    handle = patch_torch()
    try:
        assert type(nn.GRU(3, 3)) is seqfast.nn.GRU
        assert "torch.nn.GRU" in handle.patched
    finally:
        handle.undo()
    assert _all_restored() and type(nn.GRU(3, 3)) is ORIGINALS["GRU"]
    handle.undo()  # idempotent
    assert _all_restored()


def test_restores_on_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with patch_torch():
            raise RuntimeError("boom")
    assert _all_restored()


def test_nested_patches():
    with patch_torch():
        with patch_torch(include="LSTM") as inner:
            assert inner.active  # holds its own count on LSTM
            assert type(nn.LSTM(2, 2)) is seqfast.nn.LSTM
        assert type(nn.LSTM(2, 2)) is seqfast.nn.LSTM  # the inner exit left the outer patch alone
    assert _all_restored()


def test_overlapping_patches_end_in_any_order():
    """Two blocks that overlap without nesting (as two threads' blocks do): torch stays patched until the last ends."""
    first = patch_torch()
    second = patch_torch(include=["LSTM", "GRU"])
    first.undo()
    assert type(nn.LSTM(2, 2)) is seqfast.nn.LSTM  # still held by the second
    assert type(nn.LSTMCell(2, 2)) is ORIGINALS["LSTMCell"]  # only the first held it
    second.undo()
    assert _all_restored()


def test_overlapping_patches_in_two_threads():
    import threading
    inside, release, seen = threading.Event(), threading.Event(), []

    def other():
        with patch_torch():
            inside.set()
            release.wait(10)
            seen.append(type(nn.GRU(2, 2)))

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(10)
    with patch_torch():
        pass  # ends while the other thread's block is still running
    release.set()
    thread.join(10)
    assert seen == [seqfast.nn.GRU]
    assert _all_restored()


def test_torch_transformer_layers_build_seqfast_attention():
    """torch's transformer module bound MultiheadAttention at its own import: the patch reaches that binding."""
    mha = twins()[ORIGINALS["MultiheadAttention"]]
    with patch_torch():
        enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
        dec = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
        full = nn.Transformer(8, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16, dropout=0.0)
    assert type(enc.self_attn) is mha
    assert type(dec.self_attn) is mha and type(dec.multihead_attn) is mha
    assert all(type(m) is mha for m in full.modules() if isinstance(m, ORIGINALS["MultiheadAttention"]))
    assert type(nn.TransformerEncoderLayer(8, 2).self_attn) is ORIGINALS["MultiheadAttention"]  # restored
    x = torch.randn(5, 3, 8)
    reference = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
    reference.load_state_dict(enc.state_dict())
    torch.testing.assert_close(enc(x), reference(x), rtol=1e-5, atol=1e-5)


def test_include():
    with patch_torch(include=[nn.LSTM, "GRUCell"]) as handle:
        assert sorted(handle.patched) == ["torch.nn.GRUCell", "torch.nn.LSTM"]
        assert type(nn.LSTM(2, 2)) is seqfast.nn.LSTM and type(nn.GRUCell(2, 2)) is seqfast.nn.GRUCell
        assert type(nn.GRU(2, 2)) is ORIGINALS["GRU"]
    with pytest.raises(ValueError):
        patch_torch(include="encoder")  # module names mean nothing here


def test_class_defined_under_patch_is_seqfast_and_pickles():
    with patch_torch():
        class Stacked(nn.LSTM):  # third-party subclass defined while patched
            pass
        m = Stacked(3, 4)
        lstm = nn.LSTM(3, 4)
    assert issubclass(Stacked, seqfast.nn.LSTM) and isinstance(m, ORIGINALS["LSTM"])
    out, _ = m(torch.randn(5, 2, 3))
    assert out.shape == (5, 2, 4)
    clone = pickle.loads(pickle.dumps(lstm))  # built under the patch: a plain seqfast.nn.LSTM
    assert type(clone) is seqfast.nn.LSTM


def test_patched_modules_match_torch():
    torch_rnn = nn.GRU(4, 6, num_layers=2, bidirectional=True)
    with patch_torch():
        rnn = nn.GRU(4, 6, num_layers=2, bidirectional=True)
    rnn.load_state_dict(torch_rnn.state_dict())
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(rnn(x)[0], torch_rnn(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("MultiheadAttention" not in ORIGINALS, reason="seqfast MultiheadAttention not available")
def test_multihead_attention_patched():
    with patch_torch():
        mha = nn.MultiheadAttention(8, 2)
    assert type(mha) is twins()[ORIGINALS["MultiheadAttention"]]
    assert isinstance(mha, nn.MultiheadAttention)


def test_exported_from_package():
    from seqfast.patching import replace_modules
    assert seqfast.patch_torch is patch_torch and seqfast.replace_modules is replace_modules
