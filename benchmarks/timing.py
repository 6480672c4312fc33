"""Interleaved timing: every implementation of a case runs in each round, in rotating order, so that a slow spell of a
shared machine hits all of them alike; the spread of the per-round ratios shows how steady the run was."""
import statistics
import time

# Before each implementation's share of a round the process waits until its other threads are idle. Thread pools keep
# spinning after their last call: OpenMP's (torch's and seqfast's) for a few ms, ONNX Runtime's for about 40 ms on a
# Zen 3 (about 1.4 s has been reported on Intel hosts). On a 2-core machine that spinning takes a core from whatever
# runs next: measured on LSTM T32 B1 H256, seqfast's kernel read 1278 us when it ran right after ONNX Runtime's share
# and 639 us otherwise (a fixed 5 ms pause did not cover it). A pool still spins inside its own share, as it would
# in a process running that engine alone.
# Quiet means: a window of QUIET_WINDOW_S in which the other threads used under a tenth of one CPU. The window spans
# several scheduler ticks, because another thread's CPU time is only accounted at ticks (4 ms here).
QUIET_WINDOW_S = 0.01
QUIET_MAX_S = 0.5  # a pool that never goes quiet costs this per share, not a hung run


def settle():
    """Sleep until the process's other threads stop using CPU (at most QUIET_MAX_S). -> seconds waited."""
    start = time.perf_counter()
    while True:
        cpu, wall = time.process_time(), time.perf_counter()
        time.sleep(QUIET_WINDOW_S)
        busy = (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
        if busy < 0.1 or time.perf_counter() - start > QUIET_MAX_S:
            return time.perf_counter() - start


def interleaved(fns, rounds, round_time, sync=None, case_budget=None, min_rounds=3):
    """fns: {name: zero-argument callable}. -> {name: [seconds per call, one entry per round]}.

    Each callable first runs twice (warm-up: allocations, pools, lazy initialisation), then is called n times per round,
    n chosen once so that its round lasts about round_time (at least one call). case_budget (seconds): cases whose
    calls are slow get fewer rounds, down to min_rounds, so that a few large shapes do not take most of a run."""
    sync = sync or (lambda: None)
    per_call = {}
    for name, fn in fns.items():
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        per_call[name] = time.perf_counter() - start
    calls = {name: max(1, int(round_time / max(t, 1e-7))) for name, t in per_call.items()}
    if case_budget:
        per_round = sum(calls[name] * per_call[name] for name in fns)
        rounds = max(min(rounds, min_rounds), min(rounds, int(case_budget / max(per_round, 1e-9))))
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            settle()
            fn, n = fns[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / n)
    return times


def summarize(times, baseline="torch", candidate="seqfast"):
    """Medians / minima per implementation, the ratio baseline/candidate of the medians (> 1: the candidate is faster)
    and the min / max of the per-round ratios (each round times both, so a round's ratio is a paired measurement)."""
    out = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "rounds": len(t)}
           for name, t in times.items()}
    if baseline in times and candidate in times:
        paired = [a / b for a, b in zip(times[baseline], times[candidate])]
        out["ratio"] = out[baseline]["median_s"] / out[candidate]["median_s"]
        out["ratio_min"], out["ratio_max"] = min(paired), max(paired)
    return out
