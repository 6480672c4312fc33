"""Whole-model torch.save/torch.load, copy.deepcopy and pickle of models with seqfast modules; state_dicts move
between seqfast and torch models both ways."""
import copy
import io
import pickle

import pytest
import torch

import seqfast
from seqfast.patching import patch_torch, replace_modules

try:
    from seqfast.nn.attention import BahdanauAttention, LuongAttention, MultiheadAttention
except ImportError:
    BahdanauAttention = LuongAttention = MultiheadAttention = None


class Model(torch.nn.Module):
    def __init__(self, with_attention=MultiheadAttention is not None):
        super().__init__()
        self.lstm = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = torch.nn.GRU(12, 6)
        self.rnn = torch.nn.RNN(6, 6, nonlinearity="relu")
        self.cells = torch.nn.ModuleList([torch.nn.LSTMCell(6, 6), torch.nn.GRUCell(6, 6), torch.nn.RNNCell(6, 6)])
        self.mha = torch.nn.MultiheadAttention(6, 2) if with_attention else None

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y.transpose(0, 1))
        y, _ = self.rnn(y)
        if self.mha is not None:
            y = y + self.mha(y, y, y, need_weights=False)[0]
        h, c = self.cells[0](y[-1])
        h = self.cells[1](h, c)
        return self.cells[2](h)


def _models():
    torch_model = Model()
    return torch_model, replace_modules(copy.deepcopy(torch_model))


def _check_clone(clone, model, x):
    assert type(clone.lstm) is seqfast.nn.LSTM and type(clone.cells[1]) is seqfast.nn.GRUCell
    if MultiheadAttention is not None:
        assert type(clone.mha) is MultiheadAttention
    for (name, p), q in zip(model.named_parameters(), clone.parameters()):
        assert q is not p
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    clone(x).sum().backward()  # still trainable


def test_torch_save_load_whole_model():
    _, model = _models()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    clone = torch.load(buf, weights_only=False)
    _check_clone(clone, model, torch.randn(2, 5, 4))


def test_deepcopy():
    _, model = _models()
    _check_clone(copy.deepcopy(model), model, torch.randn(2, 5, 4))


def test_pickle():
    _, model = _models()
    _check_clone(pickle.loads(pickle.dumps(model)), model, torch.randn(2, 5, 4))


def test_pickle_of_model_built_under_patch_torch():
    with patch_torch():
        model = Model()
    assert type(model.gru) is seqfast.nn.GRU
    clone = pickle.loads(pickle.dumps(model))
    _check_clone(clone, model, torch.randn(2, 5, 4))


def test_state_dict_seqfast_to_torch_and_back():
    torch_model, model = _models()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # differ from torch_model's
    x = torch.randn(3, 5, 4)
    assert model.state_dict().keys() == torch_model.state_dict().keys()
    # seqfast -> torch
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh_torch = Model()
    fresh_torch.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    torch.testing.assert_close(fresh_torch(x), model(x), rtol=1e-5, atol=1e-5)
    # torch -> seqfast
    fresh_seqfast = replace_modules(Model())
    fresh_seqfast.load_state_dict(fresh_torch.state_dict(), strict=True)
    torch.testing.assert_close(fresh_seqfast(x), model(x), rtol=0, atol=0)


@pytest.mark.skipif(BahdanauAttention is None, reason="seqfast attention modules not available")
def test_decoder_attention_modules_roundtrip():
    mods = torch.nn.ModuleList([BahdanauAttention(6, 5, 4), LuongAttention(6, 5, score="general")])
    clone = pickle.loads(pickle.dumps(mods))
    q, keys = torch.randn(2, 6), torch.randn(2, 3, 5)
    for a, b in zip(mods, clone):
        torch.testing.assert_close(b(q, keys)[0], a(q, keys)[0], rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(mods, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded[0](q, keys)[0], mods[0](q, keys)[0], rtol=0, atol=0)
