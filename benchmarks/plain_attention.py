"""torch's side of seqfast's seq2seq attention modules (torch.nn has none): the same parameters, plain PyTorch math,
so a benchmark can load one module's state_dict into the other and time both on the same inputs."""
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
