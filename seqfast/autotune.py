"""Measured first-call choice between seqfast's kernel and torch's own op (opt-in, like
``torch.backends.cudnn.benchmark``).

The rule table (seqfast._rules) was measured on a few CPUs. On another CPU, a case it does not cover may run faster
on torch's op. With autotuning on, the first no-grad call of each shape class times both paths on that call's own
inputs and keeps the faster one for later calls of the class. It covers seqfast.nn.LSTM / GRU / RNN inference
without given states, and the LSTM / GRU / RNN cells (modules and seqfast.functional) under no_grad /
inference_mode. Calls that record autograd always take the rule table's choice.

    import seqfast.autotune
    seqfast.autotune.enable()          # or SEQFAST_AUTOTUNE=1 in the environment
    with torch.inference_mode():
        model(x)                       # the first call of each shape class measures both paths
    seqfast.autotune.choices()         # {shape class: "torch" | "seqfast"}

A shape class rounds each size up to a power of two (batch 24 and batch 32 share one choice). The first call of a
class costs about a dozen calls: two warm-up calls of each path, then five rounds of both, each round timing a path
for about 2 ms, at least one call. Both paths give the same results (the parity tests' tolerance); the call returns
the faster path's output. A forced backend (seqfast.use_backend, SEQFAST_BACKEND) and the rule table come first.
"""
import os
import statistics
import time

_enabled = os.environ.get("SEQFAST_AUTOTUNE", "") not in ("", "0")
_choices = {}

ROUNDS = 5
ROUND_TIME_S = 0.002


def enable(flag=True):
    """Turns autotuning on (or off with ``flag=False``). Choices already measured are kept."""
    global _enabled
    _enabled = bool(flag)


def enabled():
    """Whether autotuning is on."""
    return _enabled


def choices():
    """A copy of the choices measured so far: {shape class: "torch" | "seqfast"}."""
    return dict(_choices)


def clear():
    """Forgets every measured choice (the next call of each class measures again)."""
    _choices.clear()


def size_class(n):
    """The power of two at or above n (0 stays 0)."""
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0


def _clock():
    return time.perf_counter()


def run(key, torch_call, seqfast_call):
    """The output of the path measured faster for ``key`` (two zero-argument callables giving the same result). The
    first call of a key times both and returns the faster one's last output; later calls run the chosen path once."""
    choice = _choices.get(key)
    if choice is None:
        choice, out = _measure({"torch": torch_call, "seqfast": seqfast_call})
        _choices[key] = choice
        return out
    return (torch_call if choice == "torch" else seqfast_call)()


def _measure(calls):
    """{"torch": fn, "seqfast": fn} -> (the faster name by median time per call, its last output)."""
    out = {name: fn() for name, fn in calls.items()}  # warm-up: allocations, packing, lazy initialisation
    per_call = {}
    for name, fn in calls.items():
        start = _clock()
        out[name] = fn()
        per_call[name] = max(_clock() - start, 1e-9)
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(ROUNDS):
        for name in (names if r % 2 else names[::-1]):
            fn, n = calls[name], max(1, int(ROUND_TIME_S / per_call[name]))
            start = _clock()
            for _ in range(n):
                out[name] = fn()
            times[name].append((_clock() - start) / n)
    choice = "seqfast" if statistics.median(times["seqfast"]) < statistics.median(times["torch"]) else "torch"
    return choice, out[choice]
