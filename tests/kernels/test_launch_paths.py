"""Every internal path of the Triton launchers, forced by explicit launcher arguments (no environment variables),
compared with seqfast.reference (float64, same rounded inputs) and torch: per-step vs persistent sequence kernels,
padded (in-kernel schedule) vs packed (schedule table), batch tiles (block_m), split-KV decode with the combine
kernel, attention block sizes, allow_tf32, mixed dtypes, NaN/Inf and fully masked rows.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are tiny;
hidden sizes stay small even for the per-step path (forced with persistent=False instead of hidden > 256).
"""
import pytest
import torch

from conftest import DEVICE

triton = pytest.importorskip("triton")

from seqfast.kernels import additive_attention as AA  # noqa: E402
from seqfast.kernels import attention as A  # noqa: E402
from seqfast.kernels import rnn_cell as C  # noqa: E402
from seqfast.kernels import rnn_sequence as S  # noqa: E402
from seqfast.kernels.common import dot_precision  # noqa: E402
from seqfast.reference import (gru_layer_backward, gru_layer_forward, lstm_layer_backward,  # noqa: E402
                               lstm_layer_forward, rnn_layer_backward, rnn_layer_forward)
from seqfast.reference import sdpa_backward as ref_sdpa_backward  # noqa: E402
from seqfast.reference import sdpa_forward as ref_sdpa_forward  # noqa: E402

F32 = dict(rtol=1e-5, atol=1e-5)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def close(ours, ref, **tol):
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double().cpu(), b.double().cpu(), **(tol or F32))


def close_in_dtype(ours, ref, dtype):
    """fp32: elementwise. fp16/bf16: stored states are rounded and re-read, so the error grows with the values;
    bound it relative to each output's largest magnitude (a few roundings of the format's epsilon)."""
    if dtype == torch.float32:
        close(ours, ref)
        return
    eps = torch.finfo(dtype).eps
    for i, (a, b) in enumerate(zip(ours, ref)):
        err, size = (a.double().cpu() - b.double().cpu()).abs().max(), max(1.0, b.abs().max().item())
        assert err <= 8 * eps * size, f"output {i}: max error {err:.3g} over magnitude {size:.3g}"


# ----------------------------------------------------------------------------------------------------------------
# sequences: per-step vs persistent, padded vs packed, both directions, batch tiles
# ----------------------------------------------------------------------------------------------------------------

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _layer(kind, batch_sizes, reverse, H=5, I=3, dtype=torch.float32, **kw):
    """(ours, reference) forward outputs and input gradients of one layer (the reference in float64 on the same
    rounded inputs)."""
    N, B, G = sum(batch_sizes), batch_sizes[0], GATES[kind]
    bs = torch.tensor(batch_sizes)

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype)

    x, h0, c0 = randn(N, I), randn(B, H), randn(B, H)
    w_ih, w_hh, b_ih, b_hh = randn(G * H, I), randn(G * H, H), randn(G * H), randn(G * H)
    d = [t.double() for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)]
    if kind == "lstm":
        out = S.lstm_layer_forward(x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, **kw)
        ref = lstm_layer_forward(d[0], bs, *d[1:], reverse)
        g = [randn(N, H), randn(B, H), randn(B, H)]
        grads = S.lstm_layer_backward(*g, x, bs, h0, c0, w_ih, w_hh, out[0], out[3], out[4], reverse, **kw)
        ref_grads = lstm_layer_backward(*[t.double() for t in g], d[0], bs, *d[1:5], ref[0], ref[3], ref[4], reverse)
        return out[:3] + grads, ref[:3] + ref_grads
    if kind == "gru":
        out = S.gru_layer_forward(x, bs, h0, w_ih, w_hh, b_ih, b_hh, reverse, **kw)
        ref = gru_layer_forward(d[0], bs, d[1], *d[3:], reverse)
        g = [randn(N, H), randn(B, H)]
        grads = S.gru_layer_backward(*g, x, bs, h0, w_ih, w_hh, out[0], out[2], reverse, **kw)
        ref_grads = gru_layer_backward(*[t.double() for t in g], d[0], bs, d[1], d[3], d[4], ref[0], ref[2], reverse)
        return out[:2] + grads, ref[:2] + ref_grads
    out = S.rnn_layer_forward(x, bs, h0, w_ih, w_hh, b_ih, b_hh, True, reverse, **kw)
    ref = rnn_layer_forward(d[0], bs, d[1], *d[3:], True, reverse)
    g = [randn(N, H), randn(B, H)]
    grads = S.rnn_layer_backward(*g, x, bs, h0, w_ih, w_hh, out[0], True, reverse, **kw)
    ref_grads = rnn_layer_backward(*[t.double() for t in g], d[0], bs, d[1], d[3], d[4], ref[0], True, reverse)
    return tuple(out) + grads, tuple(ref) + ref_grads


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per_step"])
@pytest.mark.parametrize("batch_sizes,reverse", [([3, 3, 3], False), ([3, 2, 2, 1], True), ([3, 3, 1], False)],
                         ids=["padded_fwd", "packed_rev", "packed_fwd"])
def test_sequence_paths(kind, persistent, batch_sizes, reverse):
    ours, ref = _layer(kind, batch_sizes, reverse, persistent=persistent)
    close(ours, ref)


# dtype (the Triton backend's: fp32, fp16, bf16), path, batch tile, layout, direction: each launch variant of
# _sequence_kernel once per cell type (the interpreter computes 16-bit dots in fp32, so fp16/bf16 check the storage
# rounding here, the MMA only on a GPU)
SEQUENCE_VARIANTS = {
    "f32-persistent-padded-rev": (torch.float32, True, None, [3, 3, 3], True),
    "f16-per_step-bm32-packed-fwd": (torch.float16, False, 32, [3, 2, 2, 1], False),
    "bf16-per_step-bm16-2tiles-rev": (torch.bfloat16, False, 16, [18, 18, 17, 3], True),
    "bf16-persistent-bm32-padded-fwd": (torch.bfloat16, True, 32, [3, 3, 3], False),
}


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("variant", list(SEQUENCE_VARIANTS))
def test_sequence_dtypes_tiles_and_directions(kind, variant):
    dtype, persistent, block_m, batch_sizes, reverse = SEQUENCE_VARIANTS[variant]
    ours, ref = _layer(kind, batch_sizes, reverse, H=4, dtype=dtype, persistent=persistent, block_m=block_m)
    close_in_dtype(ours, ref, dtype)


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per_step"])
def test_sequence_batch_tiles(persistent):
    """block_m=16 over 20 rows: two batch tiles, the second partial, the packed tail leaving it."""
    ours, ref = _layer("lstm", [20, 20, 17, 3], False, H=4, persistent=persistent, block_m=16)
    close(ours, ref)


def test_sequence_plan_is_cached_and_padded_input_builds_no_table():
    bs = torch.tensor([4, 4, 4])
    plan = S._plan(bs, False, torch.device(DEVICE))
    assert plan.uniform and plan.sched is None and plan.prev is None  # nothing built on the host for the device
    packed = S._plan(torch.tensor([4, 3, 1]), True, torch.device(DEVICE))
    assert packed.sched is not None
    assert S._plan(torch.tensor([4, 3, 1]), True, torch.device(DEVICE)) is packed


# ----------------------------------------------------------------------------------------------------------------
# cells: batch tiles and TF32
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_m", [16, 32])
def test_cell_batch_tiles(block_m):
    B, I, H = 37, 3, 5
    x, h, c = randn(B, I), randn(B, H), randn(B, H)
    w4, u4, b4 = randn(4 * H, I), randn(4 * H, H), randn(4 * H)
    hy, cy, _ = C.lstm_cell_forward(x, h, c, w4, u4, b4, None, block_m=block_m)
    ref = torch.lstm_cell(x.double(), (h.double(), c.double()), w4.double(), u4.double(), b4.double(), None)
    close((hy, cy), ref)
    w3, u3 = randn(3 * H, I), randn(3 * H, H)
    hy, _ = C.gru_cell_forward(x, h, w3, u3, None, b4[:3 * H], block_m=block_m)
    close((hy,), (torch.gru_cell(x.double(), h.double(), w3.double(), u3.double(), None, b4[:3 * H].double()),))
    w1, u1 = randn(H, I), randn(H, H)
    hy = C.rnn_cell_forward(x, h, w1, u1, relu=True, block_m=block_m)
    close((hy,), (torch.rnn_relu_cell(x.double(), h.double(), w1.double(), u1.double(), None, None),))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("dtype,block_m", [(torch.float16, 32), (torch.bfloat16, 16)], ids=["f16-bm32", "bf16-bm16"])
def test_cell_dtypes_forward_and_backward(kind, dtype, block_m):
    """The cell kernels (forward tile GEMM and backward pointwise kernel) in 16-bit, 37 rows over several tiles,
    against seqfast.reference in float64 on the same rounded inputs."""
    from seqfast.reference import rnn_cell as R
    B, I, H, G = 37, 3, 5, GATES[kind]
    t = [torch.randn(*s, device=DEVICE, dtype=dtype) for s in ((B, I), (B, H), (B, H), (G * H, I), (G * H, H),
                                                               (G * H,), (G * H,), (B, H), (B, H))]
    x, h, c, w, u, bi, bh, gh, gc = t
    d = [v.double() for v in t]
    if kind == "lstm":
        hy, cy, gates = C.lstm_cell_forward(x, h, c, w, u, bi, bh, block_m=block_m)
        ref = R.lstm_cell_forward(*d[:7])
        grads = C.lstm_cell_backward(gh, gc, x, h, c, w, u, gates, cy)
        ref_grads = R.lstm_cell_backward(d[7], d[8], *d[:5], ref[2], ref[1])
        close_in_dtype((hy, cy) + grads, ref[:2] + ref_grads, dtype)
    elif kind == "gru":
        hy, ws = C.gru_cell_forward(x, h, w, u, bi, bh, block_m=block_m)
        ref = R.gru_cell_forward(d[0], d[1], *d[3:7])
        grads = C.gru_cell_backward(gh, x, h, w, u, ws)
        close_in_dtype((hy,) + grads, ref[:1] + R.gru_cell_backward(d[7], d[0], d[1], d[3], d[4], ref[1]), dtype)
    else:
        hy = C.rnn_cell_forward(x, h, w, u, bi, bh, relu=False, block_m=block_m)
        ref = R.rnn_cell_forward(d[0], d[1], *d[3:7], False)
        grads = C.rnn_cell_backward(gh, x, h, w, u, hy, relu=False)
        close_in_dtype((hy,) + grads, (ref,) + R.rnn_cell_backward(d[7], d[0], d[1], d[3], d[4], ref, False), dtype)


def test_tf32_follows_torch_flags():
    """allow_tf32=None: cuDNN's flag for the recurrent kernels, the matmul flag for attention; explicit wins;
    fp16/bf16 are unaffected; fp64 is always exact."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for cudnn, matmul in ((True, False), (False, True)):
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
            rnn, attn = ("tf32" if cudnn else "ieee"), ("tf32" if matmul else "ieee")
            assert dot_precision(torch.float32, None, "cudnn") == rnn
            assert dot_precision(torch.float32, None, "matmul") == attn
            assert C.cell_forward_launch(8, 8, 4, torch.float32).constexprs["PREC"] == rnn
            assert S.sequence_launch(8, 8, 4, torch.float32, persistent=True).constexprs["PREC"] == rnn
            assert A.forward_launch(1, 1, 8, 16, 16, torch.float32).constexprs["DOT_PREC"] == attn
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert dot_precision(torch.float32, True, "cudnn") == "tf32"
    assert dot_precision(torch.float32, False, "matmul") == "ieee"
    assert dot_precision(torch.float64, True, "matmul") == "ieee"
    assert dot_precision(torch.bfloat16, False, "matmul") == "tf32"  # ignored by the bf16 MMA


def test_allow_tf32_runs():
    """The TF32 variants run and stay within TF32's error (10-bit mantissa products; exact under the interpreter)."""
    x, h, c, w, u = randn(4, 3), randn(4, 5), randn(4, 5), randn(20, 3), randn(20, 5)
    hy, cy, _ = C.lstm_cell_forward(x, h, c, w, u, allow_tf32=True)
    close((hy, cy), torch.lstm_cell(x, (h, c), w, u), rtol=1e-2, atol=1e-2)
    q, k, v = randn(1, 2, 5, 16), randn(1, 2, 7, 16), randn(1, 2, 7, 16)
    out, _ = A.sdpa_forward(q, k, v, None, False, None, True)
    close((out,), (torch.nn.functional.scaled_dot_product_attention(q, k, v),), rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# attention: block sizes, split-KV decode + combine, compile-stable decode, folded grids
# ----------------------------------------------------------------------------------------------------------------

def _sdpa_case(N, Hq, Hk, Lq, Lk, D, bias=False, dtype=torch.float32):
    q, k, v = randn(N, Hq, Lq, D, dtype=dtype), randn(N, Hk, Lk, D, dtype=dtype), randn(N, Hk, Lk, D, dtype=dtype)
    b = randn(N, Hq, Lq, Lk, dtype=dtype) if bias else None
    return q, k, v, b


@pytest.mark.parametrize("block_m,block_n,causal", [(16, 16, False), (32, 16, True), (16, 32, True)])
def test_attention_block_sizes(block_m, block_n, causal):
    q, k, v, b = _sdpa_case(1, 4, 2, 37, 41, 24, bias=True)
    scale = 0.3
    out, lse = A.sdpa_forward(q, k, v, b, causal, scale, block_m=block_m, block_n=block_n)
    d = [t.double() for t in (q, k, v, b)]
    ref_out, ref_lse = ref_sdpa_forward(*d, causal, scale)
    close((out, lse), (ref_out, ref_lse))
    g = randn(*out.shape)
    grads = A.sdpa_backward(g, q, k, v, out, lse, b, causal, scale, block_m=block_m, block_n=block_n)
    close(grads, ref_sdpa_backward(g.double(), *d[:3], ref_out, ref_lse, d[3], causal, scale))


@pytest.mark.parametrize("dtype,causal", [(torch.float16, True), (torch.bfloat16, False)], ids=["f16-causal", "bf16"])
def test_attention_16bit_with_bias(dtype, causal):
    """Forward, backward and a two-split decode step in 16-bit, with an additive mask (the bias block of every
    pass), against the float64 reference on the same rounded inputs."""
    q, k, v, b = _sdpa_case(1, 2, 1, 19, 23, 16, bias=True, dtype=dtype)
    out, lse = A.sdpa_forward(q, k, v, b, causal, None, block_m=16, block_n=16)
    d = [t.double() for t in (q, k, v, b)]
    ref_out, ref_lse = ref_sdpa_forward(*d, causal, 0.25)
    close_in_dtype((out, lse), (ref_out, ref_lse), dtype)
    g = randn(*out.shape, dtype=dtype)
    grads = A.sdpa_backward(g, q, k, v, out, lse, b, causal, None, block_m=16, block_n=16)
    close_in_dtype(grads, ref_sdpa_backward(g.double(), *d[:3], ref_out, ref_lse, d[3], causal, 0.25), dtype)
    out1, _ = A.sdpa_forward(q[:, :, :1], k, v, b[:, :, :1], False, None, num_splits=2, block_n=16)
    close_in_dtype((out1,), (ref_sdpa_forward(d[0][:, :, :1], d[1], d[2], d[3][:, :, :1], False, 0.25)[0],), dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
def test_decode_splits_and_combine(num_splits):
    q, k, v, b = _sdpa_case(2, 4, 2, 1, 150, 16, bias=True)
    b[0, 1, 0, :] = float("-inf")  # one fully masked decoder row: 0 output, lse -inf through the combine kernel
    out, lse = A.sdpa_forward(q, k, v, b, False, None, num_splits=num_splits, block_n=16)
    ref_out, ref_lse = ref_sdpa_forward(*[t.double() for t in (q, k, v, b)], False, 16 ** -0.5)
    close((out, lse), (ref_out, ref_lse))
    assert lse[0, 1, 0] == float("-inf") and (out[0, 1] == 0).all()
    dec, comb, splits, _ = A.decode_launch(2, 4, 2, 150, 16, 16, torch.float32, num_splits=num_splits, block_n=16)
    assert splits == num_splits and (comb is not None) == (num_splits > 1)


def test_decode_compiles_one_kernel_as_the_cache_grows():
    """From 1 to 8192 keys the decode and combine kernels see two and one sets of compile-time constants; the
    split count, chunk and length are run-time arguments Triton does not specialise on."""
    decode_consts, combine_consts = set(), set()
    for lk in range(1, 8193, 7):
        dec, comb, splits, chunk = A.decode_launch(8, 32, 8, lk, 128, 128, torch.bfloat16, num_sms=132,
                                                   interp=False)
        decode_consts.add(tuple(sorted(dec.constexprs.items())))
        if comb is not None:
            combine_consts.add(tuple(sorted(comb.constexprs.items())))
    assert len(decode_consts) <= 2 and len(combine_consts) <= 1


def test_attention_grids_fold_batch_and_heads():
    """4096 x 32 heads = 131072 rows of (batch, head): one grid axis, within CUDA's limits."""
    launch = A.forward_launch(4096, 32, 64, 128, 128, torch.bfloat16, interp=False)
    assert len(launch.grid) == 1 and 65535 < launch.grid[0] < 2 ** 31
    for launch in A.backward_launches(4096, 32, 8, 64, 64, 128, 128, torch.bfloat16, interp=False):
        assert len(launch.grid) == 1
    dec, _, _, _ = A.decode_launch(4096, 32, 32, 8192, 128, 128, torch.float16, num_sms=132, interp=False)
    assert len(dec.grid) == 1


def test_grid_limit_is_checked():
    from seqfast.kernels.common import check_grid
    with pytest.raises(RuntimeError, match="exceeds CUDA's limits"):
        check_grid((1, 65536))
    check_grid((2 ** 31 - 1, 65535))


# ----------------------------------------------------------------------------------------------------------------
# issue 14: NaN/Inf propagate like torch; fully masked rows give 0, zero gradients and lse -inf
# ----------------------------------------------------------------------------------------------------------------

def _nan_pattern_case(where):
    q, k, v, b = _sdpa_case(1, 2, 2, 6, 9, 16, bias=True)
    if where == "q":
        q[0, 0, 2, 3] = float("nan")
    elif where == "k":
        k[0, 1, 4, 0] = float("nan")
    elif where == "k_inf":
        k[0, 1, 4, 0] = float("inf")
    elif where == "mask":
        b[0, 0, 1, 5] = float("nan")
    return q, k, v, b


@pytest.mark.parametrize("where", ["q", "k", "k_inf", "mask"])
def test_nan_and_inf_propagate_like_torch(where):
    q, k, v, b = _nan_pattern_case(where)
    out, lse = A.sdpa_forward(q, k, v, b, False, None, block_m=16, block_n=16)
    expected = torch.nn.functional.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu(), attn_mask=b.cpu())
    assert torch.equal(out.isnan().cpu(), expected.isnan())
    assert expected.isnan().any() or where == "k_inf"  # an infinite key gives torch +-inf scores, not NaN
    fine = ~expected.isnan()
    torch.testing.assert_close(out.cpu()[fine], expected[fine], **F32)
    g = torch.ones_like(out)
    dq, dk, dv = A.sdpa_backward(g, q, k, v, out, lse, b, False, None, block_m=16, block_n=16)
    ref = ref_sdpa_backward(g.double(), *[t.double() for t in (q, k, v)], *ref_sdpa_forward(
        *[t.double() for t in (q, k, v, b)], False, 16 ** -0.5), b.double(), False, 16 ** -0.5)
    for ours, theirs in zip((dq, dk, dv), ref):
        assert torch.equal(ours.isnan().cpu(), theirs.isnan().cpu())


@pytest.mark.parametrize("Lq", [1, 5])
def test_fully_masked_rows(Lq):
    q, k, v, b = _sdpa_case(1, 2, 1, Lq, 8, 16, bias=True)
    b[0, 1, 0, :] = float("-inf")
    q.requires_grad_(False)
    out, lse = A.sdpa_forward(q, k, v, b, False, None)
    assert (out[0, 1, 0] == 0).all() and lse[0, 1, 0] == float("-inf")
    assert torch.isfinite(out).all()
    if Lq > 1:
        dq, dk, dv = A.sdpa_backward(randn(*out.shape), q, k, v, out, lse, b, False, None)
        assert (dq[0, 1, 0] == 0).all()
        assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


# ----------------------------------------------------------------------------------------------------------------
# mixed dtypes: torch's RuntimeError naming the argument, never a Triton CompilationError
# ----------------------------------------------------------------------------------------------------------------

def test_mixed_dtypes_raise_runtime_error():
    x, h, c = randn(2, 3), randn(2, 4), randn(2, 4)
    w, u = randn(16, 3), randn(16, 4)
    with pytest.raises(RuntimeError, match="w_hh"):
        C.lstm_cell_forward(x, h, c, w, u.half())
    with pytest.raises(RuntimeError, match="b_ih"):
        C.gru_cell_forward(x, h, w[:12], u[:12], torch.zeros(12, dtype=torch.float64, device=DEVICE))
    with pytest.raises(RuntimeError, match="h0"):
        S.lstm_layer_forward(randn(4, 3), torch.tensor([2, 2]), h.bfloat16(), c, w, u)
    q = randn(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="key.dtype"):
        A.sdpa_forward(q, q.half(), q, None, False, None)
    with pytest.raises(RuntimeError, match="bias"):
        A.sdpa_forward(q, q, q, torch.zeros(1, 1, 4, 4, dtype=torch.float64, device=DEVICE), False, None)
    with pytest.raises(RuntimeError, match="kp"):
        AA.additive_attention_forward(randn(2, 4), randn(2, 3, 4).half(), randn(4), randn(2, 3, 5))


# ----------------------------------------------------------------------------------------------------------------
# additive attention: value dims walked in blocks
# ----------------------------------------------------------------------------------------------------------------

def test_additive_value_dim_blocks():
    N, S_, A_, Dv = 3, 7, 5, 40
    qp, kp, v, vals = randn(N, A_), randn(N, S_, A_), randn(A_), randn(N, S_, Dv)
    mask = torch.ones(N, S_, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    mask[2, :3] = False
    ctx, w = AA.additive_attention_forward(qp, kp, v, vals, mask, block_dv=16)
    score = (torch.tanh(qp[:, None].double() + kp.double()) * v.double()).sum(-1).masked_fill(~mask, float("-inf"))
    ref_w = torch.nan_to_num(score.softmax(-1), nan=0.0)
    close((w, ctx), (ref_w, (ref_w[..., None] * vals.double()).sum(1)))
    g_ctx, g_w = randn(N, Dv), randn(N, S_)
    grads = AA.additive_attention_backward(g_ctx, g_w, qp, kp, v, vals, mask, w, block_dv=16)
    ref = AA.additive_attention_backward(g_ctx, g_w, qp, kp, v, vals, mask, w)  # one block of 64 columns
    close(grads, ref)


# ----------------------------------------------------------------------------------------------------------------
# device guard (needs two GPUs)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_launches_run_on_the_tensors_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    q = torch.randn(1, 2, 8, 16, device="cuda:1")
    with torch.cuda.device(0):
        out, _ = A.sdpa_forward(q, q, q, None, False, None)
        x, h = torch.randn(2, 3, device="cuda:1"), torch.randn(2, 4, device="cuda:1")
        hy = C.rnn_cell_forward(x, h, torch.randn(4, 3, device="cuda:1"), torch.randn(4, 4, device="cuda:1"))
    torch.cuda.synchronize(1)
    close((out,), (torch.nn.functional.scaled_dot_product_attention(q, q, q),), rtol=2e-3, atol=2e-3)
    assert hy.device == x.device


@pytest.mark.cuda
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per_step"])
def test_padded_sequence_captures_in_a_cuda_graph(persistent):
    """Padded input builds nothing on the host per call, so the whole layer (per-step launches included) can be
    captured in a CUDA graph and replayed."""
    B, T, I, H = 4, 5, 8, 16
    bs = torch.tensor([B] * T)
    x, h0, c0 = randn(B * T, I), randn(B, H), randn(B, H)
    w, u, b = randn(4 * H, I), randn(4 * H, H), randn(4 * H)
    eager = S.lstm_layer_forward(x, bs, h0, c0, w, u, b, b, persistent=persistent)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = S.lstm_layer_forward(x, bs, h0, c0, w, u, b, b, persistent=persistent)
    graph.replay()
    torch.cuda.synchronize()
    close(captured[:3], eager[:3], rtol=0, atol=0)
