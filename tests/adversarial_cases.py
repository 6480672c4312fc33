"""Adversarial inputs that could crash the process if a kernel trusted them (tests/test_adversarial.py runs this file
in a child process, one group per process, so a segfault or a hang fails a test instead of killing the run).

    python tests/adversarial_cases.py <group>

prints one line per case, "ok <case>" or "FAIL <case>: <why>", and exits 0 when every case is ok.
"""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.nn.utils.rnn import PackedSequence  # noqa: E402

import seqfast  # noqa: E402

try:
    import triton  # noqa: F401
    BACKENDS = ["cpp", "reference", "triton"]
except ImportError:
    BACKENDS = ["cpp", "reference"]

# (name, data rows, batch_sizes): none is what pack_padded_sequence can produce
BAD_PACKS = [
    ("sums past the data", 5, [3, 3]),
    ("sums short of the data", 5, [2, 2]),
    ("increasing", 3, [1, 2]),
    ("a zero", 3, [2, 0, 1]),
    ("a trailing zero", 3, [2, 1, 0]),
    ("negative", 1, [2, -1]),
    ("huge", 4, [1 << 40, 1]),
]


def packed_sequences():
    for name in ("LSTM", "GRU", "RNN"):
        module = getattr(seqfast.nn, name)(3, 4)
        for what, rows, sizes in BAD_PACKS:
            for backend in BACKENDS:
                packed = PackedSequence(torch.randn(rows, 3), torch.tensor(sizes, dtype=torch.int64))
                try:
                    with seqfast.use_backend(backend):
                        module(packed)
                except RuntimeError:
                    yield f"{name} {backend} batch_sizes {what}", None
                else:
                    yield f"{name} {backend} batch_sizes {what}", "accepted (torch raises RuntimeError)"
        # states for another batch than the first step's
        packed = PackedSequence(torch.randn(3, 3), torch.tensor([2, 1]))
        h = torch.zeros(1, 3, 4)
        try:
            module(packed, (h, h) if name == "LSTM" else h)
        except RuntimeError:
            yield f"{name} states batch != batch_sizes[0]", None
        else:
            yield f"{name} states batch != batch_sizes[0]", "accepted"


def _nan_rows(out):
    return torch.isnan(out).any(-1)


def sdpa_nan():
    """NaN / Inf in q, k, v or a float mask reach the output as in torch (NaN), on every backend; rows whose every
    key is masked stay 0 (seqfast's contract; not mixed with NaN here)."""
    N, H, L, S, D = 1, 2, 5, 7, 8
    for backend in BACKENDS:
        for where in ("q", "k", "v", "mask", "k-inf"):
            torch.manual_seed(0)
            q, k, v = torch.randn(N, H, L, D), torch.randn(N, H, S, D), torch.randn(N, H, S, D)
            mask = torch.randn(L, S)
            if where == "q":
                q[0, 1, 2, 3] = float("nan")
            elif where == "k":
                k[0, 0, 4, 1] = float("nan")
            elif where == "v":
                v[0, 1, 6, 0] = float("nan")
            elif where == "mask":
                mask[3, 2] = float("nan")
            else:
                k[0, 0, 4, 1] = float("inf")
            want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                                    attn_mask=mask.double())
            for causal_case in (False,):
                with seqfast.use_backend(backend):
                    got = seqfast.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
                    seqfast.functional.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask).sum().backward()
                problem = None
                if not torch.equal(_nan_rows(got), _nan_rows(want)):
                    problem = f"NaN rows {_nan_rows(got).int().tolist()} != torch's {_nan_rows(want).int().tolist()}"
                elif not torch.isnan(q_.grad).any() and where != "v":
                    problem = "the gradient hides the NaN"
                yield f"sdpa {backend} NaN/Inf in {where}", problem
        # decoder step (query length 1) too
        torch.manual_seed(1)
        q, k, v = torch.randn(2, 2, 1, D), torch.randn(2, 2, S, D), torch.randn(2, 2, S, D)
        k[1, 0, 3, 0] = float("nan")
        with seqfast.use_backend(backend):
            got = seqfast.functional.scaled_dot_product_attention(q, k, v)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        yield f"sdpa {backend} decode NaN in k", (None if torch.equal(_nan_rows(got), _nan_rows(want))
                                                    else "NaN hidden")
        # fully masked rows: 0, never NaN
        bias = torch.zeros(1, 1, L, S)
        bias[..., 2, :] = float("-inf")
        q, k, v = torch.randn(1, 1, L, D), torch.randn(1, 1, S, D), torch.randn(1, 1, S, D)
        with seqfast.use_backend(backend):
            got = seqfast.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        yield f"sdpa {backend} fully masked row", (None if torch.equal(got[..., 2, :], torch.zeros(1, 1, D))
                                                     else f"row {got[..., 2, :].tolist()}")


def masks():
    """Masks of the wrong shape raise; broadcast ones of any size are read within bounds."""
    q = torch.randn(2, 2, 3, 4)
    for backend in BACKENDS:
        with seqfast.use_backend(backend):
            for shape in [(4, 3), (2, 3, 3, 3), (3, 2)]:
                try:
                    seqfast.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(shape))
                except RuntimeError:
                    yield f"sdpa {backend} mask {shape}", None
                else:
                    yield f"sdpa {backend} mask {shape}", "accepted"
            for cls in ("BahdanauAttention", "LuongAttention"):
                attn = seqfast.nn.BahdanauAttention(8, 8, 4) if cls[0] == "B" else seqfast.nn.LuongAttention(8)
                S = 4096
                keys = torch.randn(2, S, 8)
                for shape in [(1, S), (2, 1)]:
                    mask = torch.ones(shape, dtype=torch.bool)
                    context, weights = attn(torch.randn(2, 8), keys, mask)
                    ok = weights.shape == (2, S) and torch.allclose(weights.sum(-1), torch.ones(2))
                    yield f"{cls} {backend} mask {shape}", None if ok else "wrong weights"
                try:
                    attn(torch.randn(2, 8), keys, torch.ones(2, S // 2, dtype=torch.bool))
                except ValueError:
                    yield f"{cls} {backend} mask [B, S/2]", None
                else:
                    yield f"{cls} {backend} mask [B, S/2]", "accepted"


GROUPS = {"packed_sequences": packed_sequences, "sdpa_nan": sdpa_nan, "masks": masks}

if __name__ == "__main__":
    failed = False
    for case, problem in GROUPS[sys.argv[1]]():
        failed = failed or problem is not None
        print(f"ok {case}" if problem is None else f"FAIL {case}: {problem}", flush=True)
    sys.exit(1 if failed else 0)
