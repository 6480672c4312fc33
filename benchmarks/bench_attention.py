"""Attention: seqfast vs torch on the same inputs.
- SDPA, batch 1, 8 heads, L {128, 512, 1024} x head_dim {64, 128}, causal and not, forward and forward+backward;
- the seq2seq decoder step: query length 1, keys {128, 512, 2048}, batch 32, 8 heads, head_dim 64;
- MultiheadAttention inside torch.nn.TransformerEncoderLayer (d_model 256, 8 heads, L 256, batch 8), training step;
- one Bahdanau decoder step (batch 32, source 512, attention 256, values 512) against the plain formula."""
import pytest
import torch
import torch.nn.functional as F

import seqfast
from conftest import DEVICES


def _impl_sdpa(impl):
    return F.scaled_dot_product_attention if impl == "torch" else seqfast.functional.scaled_dot_product_attention


@pytest.mark.parametrize("impl", ["torch", "seqfast"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("L", [128, 512, 1024])
@pytest.mark.parametrize("device", DEVICES)
def test_sdpa(timed, benchmark, device, L, head_dim, causal, mode, impl):
    benchmark.group = f"sdpa {device} fp32 B1 H8 L{L} D{head_dim} {'causal' if causal else 'full'} {mode}"
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, L, head_dim, device=device, requires_grad=mode != "fwd") for _ in range(3))
    fn = _impl_sdpa(impl)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return fn(q, k, v, is_causal=causal)
        fn(q, k, v, is_causal=causal).sum().backward()

    timed(step, device, 5 if L >= 512 else None)


@pytest.mark.parametrize("impl", ["torch", "seqfast"])
@pytest.mark.parametrize("keys", [128, 512, 2048])
@pytest.mark.parametrize("device", DEVICES)
def test_decoder_step(timed, benchmark, device, keys, impl):
    benchmark.group = f"sdpa decoder step {device} fp32 B32 H8 Lq1 Lk{keys} D64"
    torch.manual_seed(0)
    q = torch.randn(32, 8, 1, 64, device=device)
    k, v = (torch.randn(32, 8, keys, 64, device=device) for _ in range(2))
    fn = _impl_sdpa(impl)

    def step():
        with torch.no_grad():
            return fn(q, k, v)

    timed(step, device)


@pytest.mark.parametrize("impl", ["torch", "seqfast"])
@pytest.mark.parametrize("device", DEVICES)
def test_transformer_encoder_layer(timed, benchmark, device, impl):
    benchmark.group = f"TransformerEncoderLayer {device} fp32 d256 H8 L256 B8 train step"
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(256, 8, dim_feedforward=1024, dropout=0.0, batch_first=True).to(device)
    if impl == "seqfast":
        seqfast.replace_modules(layer)
    x = torch.randn(8, 256, 256, device=device, requires_grad=True)

    def step():
        layer(x).sum().backward()

    timed(step, device, 15)


def _bahdanau_plain(qp, kp, v, values, mask):
    scores = torch.tanh(qp[:, None, :] + kp) @ v
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return torch.bmm(weights[:, None], values)[:, 0], weights


@pytest.mark.parametrize("impl", ["torch", "seqfast"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("device", DEVICES)
def test_bahdanau_step(timed, benchmark, device, mode, impl):
    """impl "torch" is the plain PyTorch formula (there is no torch.nn Bahdanau module)."""
    benchmark.group = f"bahdanau step {device} fp32 B32 S512 A256 Dv512 {mode}"
    torch.manual_seed(0)
    grad = mode != "fwd"
    qp = torch.randn(32, 256, device=device, requires_grad=grad)
    kp = torch.randn(32, 512, 256, device=device, requires_grad=grad)
    v = torch.randn(256, device=device, requires_grad=grad)
    values = torch.randn(32, 512, 512, device=device, requires_grad=grad)
    mask = torch.rand(32, 512, device=device) > 0.1
    from seqfast.ops.attention import additive_attention
    fn = _bahdanau_plain if impl == "torch" else additive_attention

    def step():
        if not grad:
            with torch.no_grad():
                return fn(qp, kp, v, values, mask)
        ctx, w = fn(qp, kp, v, values, mask)
        ctx.sum().backward()

    timed(step, device)
