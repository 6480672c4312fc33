"""The plain PyTorch twins of seqfast.nn.LuongAttention(score="general") and BahdanauAttention: the same parameters
(a state_dict loads either way) and the math as a torch user writes it. torch.nn has no such modules, so these are
torch's side wherever seqfast's are compared with plain PyTorch: the benchmarks time them, the seq2seq example trains
with them. Unlike seqfast's modules (see attention.py's contract) a fully masked row gives NaN here, as a plain
masked softmax does."""
import torch


class LuongAttention(torch.nn.Module):
    """seqfast.nn.LuongAttention(score="general") in plain PyTorch: scores keys . (W q), masked softmax, weighted
    sum."""

    def __init__(self, query_size, key_size):
        super().__init__()
        self.W = torch.nn.Linear(query_size, key_size, bias=False)

    def forward(self, query, keys, mask=None, values=None):
        values = keys if values is None else values
        scores = torch.bmm(keys, self.W(query).unsqueeze(-1)).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, -1)
        return torch.bmm(weights.unsqueeze(1), values).squeeze(1), weights


class BahdanauAttention(torch.nn.Module):
    """seqfast.nn.BahdanauAttention in plain PyTorch: scores v . tanh(W q + U k), masked softmax, weighted sum."""

    def __init__(self, query_size, key_size, attn_size):
        super().__init__()
        self.W = torch.nn.Linear(query_size, attn_size, bias=False)
        self.U = torch.nn.Linear(key_size, attn_size, bias=True)
        self.v = torch.nn.Parameter(torch.empty(attn_size))

    def forward(self, query, keys, mask=None, values=None):
        values = keys if values is None else values
        scores = torch.tanh(self.W(query).unsqueeze(1) + self.U(keys)) @ self.v
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, -1)
        return torch.bmm(weights.unsqueeze(1), values).squeeze(1), weights
