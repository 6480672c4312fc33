"""The score layers of LuongAttention / BahdanauAttention: torch.nn.Linear (constructor, parameters, init,
state_dict, hooks, repr) whose forward runs seqfast.functional._linear.linear (the own GEMM for float32 / float64 CPU
tensors, torch's F.linear for everything else)."""
import torch

from ..functional._linear import linear


class Linear(torch.nn.Linear):
    __doc__ = torch.nn.Linear.__doc__

    def forward(self, input):
        return linear(input, self.weight, self.bias)
