"""End to end: a small seq2seq translator (embedding, GRU/LSTM encoder, GRUCell/LSTMCell decoder stepped in a loop
with Bahdanau or Luong attention over the encoder states, padded sources with a mask) written with torch modules,
then moved to seqfast with one call: its training losses equal torch's step for step for 20 optimizer steps.

The attention modules are written inline in plain torch (a user's own code) with the parameter names of
seqfast.nn.BahdanauAttention / LuongAttention, so the seqfast model is the torch model after replace_modules (or
built under patch_torch) with the attention module swapped for seqfast's, loading its state_dict."""
import copy

import pytest
import torch
import torch.nn.functional as F

import seqfast
from seqfast.patching import patch_torch, replace_modules

attention = pytest.importorskip("seqfast.nn.attention")

VOCAB, PAD, BOS = 16, 0, 1
EMB, HID, ATTN = 8, 16, 12
BATCH, SRC, TGT = 6, 7, 6
STEPS = 20


class TorchBahdanau(torch.nn.Module):
    """v . tanh(W q + U k_j), masked softmax, weighted sum of the values: plain torch."""

    def __init__(self, query_size, key_size, attn_size):
        super().__init__()
        self.W = torch.nn.Linear(query_size, attn_size, bias=False)
        self.U = torch.nn.Linear(key_size, attn_size)
        self.v = torch.nn.Parameter(torch.empty(attn_size).uniform_(-attn_size ** -0.5, attn_size ** -0.5))

    def forward(self, query, keys, mask=None, values=None):
        values = keys if values is None else values
        scores = (torch.tanh(self.W(query)[:, None, :] + self.U(keys)) * self.v).sum(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, -1)
        return torch.bmm(weights[:, None, :], values).squeeze(1), weights


class TorchLuong(torch.nn.Module):
    """Luong "general": k_j . (W q), masked softmax, weighted sum: plain torch."""

    def __init__(self, query_size, key_size):
        super().__init__()
        self.W = torch.nn.Linear(query_size, key_size, bias=False)

    def forward(self, query, keys, mask=None, values=None):
        values = keys if values is None else values
        scores = torch.bmm(keys, self.W(query)[:, :, None]).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, -1)
        return torch.bmm(weights[:, None, :], values).squeeze(1), weights


class Translator(torch.nn.Module):
    def __init__(self, rnn="gru", attn="bahdanau"):
        super().__init__()
        self.kind = rnn
        self.src_emb = torch.nn.Embedding(VOCAB, EMB, padding_idx=PAD)
        self.tgt_emb = torch.nn.Embedding(VOCAB, EMB, padding_idx=PAD)
        enc = torch.nn.GRU if rnn == "gru" else torch.nn.LSTM
        self.encoder = enc(EMB, HID, batch_first=True)
        cell = torch.nn.GRUCell if rnn == "gru" else torch.nn.LSTMCell
        self.decoder = cell(EMB + HID, HID)
        self.attn = TorchBahdanau(HID, HID, ATTN) if attn == "bahdanau" else TorchLuong(HID, HID)
        self.out = torch.nn.Linear(2 * HID, VOCAB)

    def forward(self, src, tgt_in):
        mask = src != PAD
        keys, state = self.encoder(self.src_emb(src))
        h = state[0][-1] if self.kind == "lstm" else state[-1]
        c = state[1][-1] if self.kind == "lstm" else None
        context = torch.zeros_like(h)
        logits = []
        for t in range(tgt_in.shape[1]):  # teacher forcing
            x = torch.cat([self.tgt_emb(tgt_in[:, t]), context], -1)
            if c is None:
                h = self.decoder(x, h)
            else:
                h, c = self.decoder(x, (h, c))
            context, _ = self.attn(h, keys, mask)
            logits.append(self.out(torch.cat([h, context], -1)))
        return torch.stack(logits, 1)


def _batch():
    """A reversal task on padded sources of different lengths."""
    g = torch.Generator().manual_seed(7)
    src = torch.randint(2, VOCAB, (BATCH, SRC), generator=g)
    lengths = torch.tensor([SRC, SRC - 1, SRC - 3, 3, SRC, 2])
    src[torch.arange(SRC)[None, :] >= lengths[:, None]] = PAD
    tgt = torch.full((BATCH, TGT), PAD)
    for b in range(BATCH):
        rev = src[b, :lengths[b]].flip(0)[:TGT]
        tgt[b, :len(rev)] = rev
    tgt_in = torch.cat([torch.full((BATCH, 1), BOS), tgt[:, :-1]], 1)
    return src, tgt_in, tgt


def _seqfast_attention(torch_attn):
    if isinstance(torch_attn, TorchBahdanau):
        mod = attention.BahdanauAttention(HID, HID, ATTN)
    else:
        mod = attention.LuongAttention(HID, HID, score="general")
    mod.load_state_dict(torch_attn.state_dict(), strict=True)
    return mod


def _losses(model, make_opt):
    opt = make_opt(model.parameters())
    src, tgt_in, tgt = _batch()
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        logits = model(src, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), ignore_index=PAD)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("rnn, attn, how, optim", [
    ("gru", "bahdanau", "replace", "adam"),
    ("lstm", "luong", "patch", "sgd"),
])
def test_translator_trains_like_torch(rnn, attn, how, optim):
    make_opt = ((lambda p: torch.optim.Adam(p, lr=1e-2)) if optim == "adam" else
                (lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9)))
    torch.manual_seed(0)
    torch_model = Translator(rnn, attn)
    if how == "replace":
        model = replace_modules(copy.deepcopy(torch_model))
        assert {r.name for r in model.seqfast_report.replaced} == {"encoder", "decoder"}
    else:  # third-party code building the model under patch_torch, then the torch model's weights loaded
        with patch_torch():
            model = Translator(rnn, attn)
        model.load_state_dict(torch_model.state_dict(), strict=True)
    model.attn = _seqfast_attention(model.attn)
    assert isinstance(model.encoder, (seqfast.nn.GRU, seqfast.nn.LSTM))
    assert isinstance(model.decoder, (seqfast.nn.GRUCell, seqfast.nn.LSTMCell))

    src, tgt_in, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt_in), torch_model(src, tgt_in), rtol=1e-5, atol=1e-5)
    ref = _losses(torch_model, make_opt)
    got = _losses(model, make_opt)
    assert ref[-1] < ref[0] * 0.8, f"the task should train: {ref.tolist()}"
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-5,
                               msg=lambda m: f"losses diverge from torch's\nseqfast {got.tolist()}\ntorch   "
                                             f"{ref.tolist()}\n{m}")
