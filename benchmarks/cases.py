"""Benchmark cases: each builds, for one implementation ("torch", "seqfast", and where a suite asks for it
"onnxruntime" or "read"), a zero-argument step on freshly seeded inputs, so every implementation of a case runs on the
same tensors and weights. Builders are module-level functions of plain parameters, so a Case pickles into the child
process that measures its memory (benchmarks/memory.py)."""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import seqfast
from machine import native_bf16
from seqfast.reference import seq2seq_attention as plain_attention


@dataclass
class Case:
    family: str          # rnn_cell | rnn_sequence | threads | attention | decoder_step | seq2seq_attention | module
    name: str            # unique, human readable
    builder: object      # builder(impl, device, **params) -> step
    params: dict = field(default_factory=dict)
    size: int = 0        # x of the ratio-against-size plot
    size_label: str = ""
    impls: tuple = ("torch", "seqfast")

    def build(self, impl, device):
        return self.builder(impl, device, **self.params)


def _twin(torch_module, seqfast_cls, impl):
    """torch's module, or a seqfast module of the same class holding the same weights."""
    if impl == "torch":
        return torch_module
    ours = seqfast_cls(*torch_module._seqfast_args, **torch_module._seqfast_kwargs)
    ours = ours.to(next(torch_module.parameters()).device, next(torch_module.parameters()).dtype)
    ours.load_state_dict(torch_module.state_dict())
    return ours


def _made(cls, *args, **kwargs):
    m = cls(*args, **kwargs)
    m._seqfast_args, m._seqfast_kwargs = args, kwargs
    return m


def _run(module_step, mode, loss):
    """The step of a case: no_grad forward for inference, forward + backward of a scalar for training."""
    if mode == "infer":
        def step():
            with torch.no_grad():
                return module_step()
        return step

    def step():
        loss(module_step()).backward()
    return step


CELLS = {"lstm": (torch.nn.LSTMCell, seqfast.nn.LSTMCell), "gru": (torch.nn.GRUCell, seqfast.nn.GRUCell),
         "rnn": (torch.nn.RNNCell, seqfast.nn.RNNCell)}


def cell(impl, device, kind, batch, hidden, mode, dtype="float32"):
    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    torch_cls, ours_cls = CELLS[kind]
    module = _twin(_made(torch_cls, hidden, hidden).to(device, dtype), ours_cls, impl if impl != "onnxruntime"
                   else "torch")
    x = torch.randn(batch, hidden, device=device, dtype=dtype, requires_grad=mode == "train")
    h = torch.randn(batch, hidden, device=device, dtype=dtype)
    state = (h, torch.randn_like(h)) if kind == "lstm" else h
    if impl == "onnxruntime":
        from onnx_step import onnx_step
        return onnx_step(module, (x, state))
    return _run(lambda: module(x, state), mode, lambda out: (out[0] if isinstance(out, tuple) else out).float().sum())


SEQUENCES = {"lstm": (torch.nn.LSTM, seqfast.nn.LSTM), "gru": (torch.nn.GRU, seqfast.nn.GRU),
             "rnn": (torch.nn.RNN, seqfast.nn.RNN)}


def sequence(impl, device, kind, T, batch, hidden, mode, layers=1, bidirectional=False, dtype="float32",
             packed=False, proj_size=0):
    """T x batch x hidden (input size = hidden); packed: lengths spread evenly over 1..T, packed inside the step;
    proj_size: an LSTM's projection (LSTMP)."""
    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    torch_cls, ours_cls = SEQUENCES[kind]
    kw = dict(proj_size=proj_size) if proj_size else {}
    module = _twin(_made(torch_cls, hidden, hidden, num_layers=layers, bidirectional=bidirectional, **kw).to(
        device, dtype), ours_cls, impl if impl != "onnxruntime" else "torch")
    x = torch.randn(T, batch, hidden, device=device, dtype=dtype, requires_grad=mode == "train")
    if impl == "onnxruntime":
        from onnx_step import onnx_step
        return onnx_step(module, (x,))
    if packed:
        lengths = torch.linspace(1, T, batch).round().long()
        forward = lambda: module(pack_padded_sequence(x, lengths, enforce_sorted=False))  # noqa: E731
    else:
        forward = lambda: module(x)  # noqa: E731

    def loss(out):
        out = out[0]
        return (out.data if isinstance(out, PackedSequence) else out).float().sum()
    return _run(forward, mode, loss)


def stepped(impl, device, kind, steps, batch, hidden):
    """A greedy decoder's recurrence: the module called once per step (a 1-step sequence) with the state the previous
    step returned, its output fed back as the next input; no grad."""
    torch.manual_seed(0)
    torch_cls, ours_cls = SEQUENCES[kind]
    module = _twin(_made(torch_cls, hidden, hidden).to(device), ours_cls, impl).eval()
    x = torch.randn(1, batch, hidden, device=device)

    def step():
        with torch.no_grad():
            out, state = module(x)
            for _ in range(steps - 1):
                out, state = module(out, state)
            return out
    return step


def sdpa(impl, device, batch, heads, L, D, causal, mode, dtype="float32", keys=None):
    """F.scaled_dot_product_attention against seqfast's; keys: the key length when it differs from L (decoder step:
    L = 1). impl "read": a plain torch.sum over as many bytes as K and V hold (the memory-bandwidth yardstick)."""
    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    S = keys or L
    if impl == "read":
        flat = torch.randn(2 * batch * heads * S * D, device=device, dtype=dtype)
        return lambda: flat.sum()
    grad = mode == "train"
    q = torch.randn(batch, heads, L, D, device=device, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(batch, heads, S, D, device=device, dtype=dtype, requires_grad=grad) for _ in range(2))
    if impl == "onnxruntime":
        from onnx_step import onnx_step
        return onnx_step(_SDPA(causal), (q, k, v))
    fn = F.scaled_dot_product_attention if impl == "torch" else seqfast.functional.scaled_dot_product_attention
    return _run(lambda: fn(q, k, v, is_causal=causal), mode, lambda out: out.float().sum())


def oversubscribed(impl, device, kind, T, batch, hidden, threads, python_threads=1):
    """A training step of a `kind` sequence with torch.set_num_threads(threads) (more than the CPUs this process may
    use, as in CPU-quota containers), run by `python_threads` Python threads at once, each on its own module (a
    server's worker threads). The previous thread count is restored after each step."""
    import threading
    steps = [sequence(impl, device, kind, T, batch, hidden, "train") for _ in range(python_threads)]

    def step():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            if python_threads == 1:
                return steps[0]()
            workers = [threading.Thread(target=s) for s in steps]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        finally:
            torch.set_num_threads(before)
    return step


class _SDPA(torch.nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


def multihead(impl, device, batch, L, embed, heads, mode):
    torch.manual_seed(0)
    module = _twin(_made(torch.nn.MultiheadAttention, embed, heads, batch_first=True).to(device),
                   seqfast.nn.MultiheadAttention, impl)
    x = torch.randn(batch, L, embed, device=device, requires_grad=mode == "train")
    return _run(lambda: module(x, x, x, need_weights=False), mode, lambda out: out[0].sum())


def encoder_layer(impl, device, batch, L, embed, heads, mode):
    """torch.nn.TransformerEncoderLayer with its MultiheadAttention swapped by seqfast.replace_modules."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(embed, heads, dim_feedforward=4 * embed, dropout=0.0,
                                             batch_first=True).to(device)
    if impl == "seqfast":
        seqfast.replace_modules(layer)
    x = torch.randn(batch, L, embed, device=device, requires_grad=mode == "train")
    return _run(lambda: layer(x), mode, lambda out: out.sum())


def seq2seq_attention(impl, device, kind, batch, source, size, mode):
    """One decoder step of Luong ("general") or Bahdanau attention: query [B, size], keys = values [B, S, size], a
    key-padding mask; seqfast.nn's module against the plain-PyTorch one holding the same weights."""
    torch.manual_seed(0)
    if kind == "luong":
        ref = plain_attention.LuongAttention(size, size).to(device)
        ours = seqfast.nn.LuongAttention(size, size, score="general")
    else:
        ref = plain_attention.BahdanauAttention(size, size, size).to(device)
        torch.nn.init.uniform_(ref.v, -size ** -0.5, size ** -0.5)
        ours = seqfast.nn.BahdanauAttention(size, size, size)
    module = ref
    if impl == "seqfast":
        module = ours.to(device)
        module.load_state_dict(ref.state_dict())
    grad = mode == "train"
    query = torch.randn(batch, size, device=device, requires_grad=grad)
    keys = torch.randn(batch, source, size, device=device, requires_grad=grad)
    mask = torch.arange(source, device=device)[None, :] < torch.randint(1, source + 1, (batch, 1), device=device)
    return _run(lambda: module(query, keys, mask), mode, lambda out: out[0].sum())


def _mode_name(mode):
    return {"infer": "inference", "train": "training"}[mode]


def bench_cases(quick=False):
    """The `make bench` set: every op and module once or more, torch eager against seqfast.
    quick: one small case per op (a smoke run of the whole pipeline)."""
    cases = []
    modes = ("infer", "train")
    cell_shapes = [(1, 128)] if quick else [(1, 128), (64, 128), (1, 512), (64, 512)]
    for kind in CELLS:
        for batch, hidden in cell_shapes:
            for mode in modes:
                cases.append(Case("rnn_cell", f"{kind.upper()}Cell B{batch} H{hidden} {_mode_name(mode)}", cell,
                                  dict(kind=kind, batch=batch, hidden=hidden, mode=mode), batch * hidden,
                                  "batch x hidden"))
    T = 16 if quick else 64
    seq_shapes = [(1, 128)] if quick else [(1, 128), (8, 128), (8, 512), (64, 512)]
    for kind in SEQUENCES:
        for batch, hidden in seq_shapes:
            for mode in modes:
                cases.append(Case("rnn_sequence", f"{kind.upper()} T{T} B{batch} H{hidden} {_mode_name(mode)}",
                                  sequence, dict(kind=kind, T=T, batch=batch, hidden=hidden, mode=mode),
                                  batch * hidden, "batch x hidden"))
    extras = [] if quick else [
        ("2 layers", dict(batch=8, hidden=256, layers=2)),
        ("bidirectional", dict(batch=8, hidden=256, bidirectional=True)),
        ("packed, lengths 1..T", dict(batch=32, hidden=256, packed=True)),
        ("bf16", dict(batch=64, hidden=512, dtype="bfloat16") if native_bf16() else
         dict(batch=8, hidden=128, dtype="bfloat16"))]
    for label, extra in extras:
        for kind in ("lstm", "gru"):
            for mode in modes:
                cases.append(Case("rnn_sequence", f"{kind.upper()} T{T} B{extra['batch']} H{extra['hidden']} {label} "
                                  f"{_mode_name(mode)}", sequence, dict(kind=kind, T=T, mode=mode, **extra),
                                  extra["batch"] * extra["hidden"], "batch x hidden"))
    # an LSTM with a projection (speech models' LSTMP): torch's CPU op runs its generic path there (no oneDNN)
    for batch, hidden, proj in ([] if quick else [(8, 512, 128), (32, 1024, 256)]):
        for mode in modes:
            cases.append(Case("rnn_sequence", f"LSTM T{T} B{batch} H{hidden} proj_size {proj} {_mode_name(mode)}",
                              sequence, dict(kind="lstm", T=T, batch=batch, hidden=hidden, mode=mode, proj_size=proj),
                              batch * hidden, "batch x hidden"))
    # a decoder stepping nn.LSTM / GRU with its state, one call per token; at batch 8, a beam of 8 hypotheses
    for kind in ("lstm", "gru"):
        for batch, hidden in (((1, 128),) if quick else ((1, 128), (1, 512), (8, 512))):
            cases.append(Case("module", f"{kind.upper()} decoder loop B{batch} H{hidden}, 16 one-step calls with "
                              f"state, inference", stepped, dict(kind=kind, steps=16, batch=batch, hidden=hidden),
                              batch * hidden, "batch x hidden"))
    # threads past the usable CPUs (issue 14: a spinning step barrier made this 100x slower than torch)
    over = [(8, 1)] if quick else [(3, 1), (8, 1), (2, 2)]
    for threads, python_threads in over:
        label = f"{python_threads} Python threads, " if python_threads > 1 else ""
        cases.append(Case("threads", f"LSTM T{T} B1 H128 training, {label}torch.set_num_threads({threads})",
                          oversubscribed, dict(kind="lstm", T=T, batch=1, hidden=128, threads=threads,
                                               python_threads=python_threads), threads, "threads"))
    sdpa_shapes = [(128, 64, True)] if quick else \
        [(L, 64, causal) for L in (128, 512, 1024) for causal in (False, True)] + [(1024, 128, True)]
    for L, D, causal in sdpa_shapes:
        for mode in modes:
            cases.append(Case("attention", f"SDPA B1 H8 L{L} D{D} {'causal' if causal else 'full'} "
                              f"{'forward' if mode == 'infer' else 'forward+backward'}", sdpa,
                              dict(batch=1, heads=8, L=L, D=D, causal=causal, mode=mode), L, "sequence length"))
    for keys in ([128] if quick else [128, 512, 2048]):
        cases.append(Case("decoder_step", f"SDPA decoder step B32 H8 keys {keys} D64", sdpa,
                          dict(batch=32, heads=8, L=1, D=64, causal=False, mode="infer", keys=keys), keys, "keys"))
    L = 64 if quick else 256
    for mode in modes:
        cases.append(Case("module", f"MultiheadAttention B8 L{L} d256 h8 {_mode_name(mode)}", multihead,
                          dict(batch=8, L=L, embed=256, heads=8, mode=mode), L, "sequence length"))
    cases.append(Case("module", f"TransformerEncoderLayer B8 L{L} d256 h8 training (MHA swapped)", encoder_layer,
                      dict(batch=8, L=L, embed=256, heads=8, mode="train"), L, "sequence length"))
    S = 64 if quick else 512
    for kind in ("luong", "bahdanau"):
        for mode in modes:
            name = f"{kind.capitalize()} decoder step B32 S{S} size 256 {_mode_name(mode)}"
            cases.append(Case("seq2seq_attention", name, seq2seq_attention, dict(kind=kind, batch=32, source=S, size=256, mode=mode), S,
                              "source length"))
    return cases
