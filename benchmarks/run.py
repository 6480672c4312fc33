"""`make bench`: torch eager against seqfast on every op and module, on the same inputs in the same run.

Per case: the ratio torch/seqfast of the median times with its spread over rounds (min / max of the per-round ratios),
and the peak memory of each implementation (CPU: resident-set high-water mark of a child process, C++ allocations
included; GPU: torch.cuda.max_memory_allocated). Writes benchmarks/results/<device>-<date>.md and .png, appends to
benchmarks/results/summary.jsonl, keeps the raw JSON in a temporary folder; a full run (no -k, no --quick) also
copies its table and plot to benchmarks/results/latest-<device>.{md,png}, which the README shows.

    python benchmarks/run.py            # the default set (a few minutes on 2 cores)
    python benchmarks/run.py --quick    # one small case per op: checks the pipeline end to end
    python benchmarks/run.py -k LSTM    # cases whose name contains a string
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
if "TRITON_INTERPRET" in os.environ:
    del os.environ["TRITON_INTERPRET"]  # the interpreter is never benchmarked

import torch  # noqa: E402

import cases as case_list  # noqa: E402
import machine as machine_info  # noqa: E402
import memory  # noqa: E402
import results  # noqa: E402
import timing  # noqa: E402


def measure(case, device, rounds, round_time, with_memory=True):
    steps = {impl: case.build(impl, device) for impl in case.impls}
    sync = torch.cuda.synchronize if device == "cuda" else None
    row = timing.summarize(timing.interleaved(steps, rounds, round_time, sync, case_budget=4.0))
    row.update(case=case.name, family=case.family, size=case.size, size_label=case.size_label)
    if with_memory:
        for impl in ("torch", "seqfast"):
            row[impl]["peak_bytes"] = memory.peak_cuda(steps[impl]) if device == "cuda" else \
                memory.peak_cpu(case, impl)
    return row


def table(rows):
    lines = ["| case | torch median | seqfast median | speedup (median) | round spread (min - max) | "
             "torch peak MB | seqfast peak MB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['case']} | {results.fmt_time(r['torch']['median_s'])} | "
                     f"{results.fmt_time(r['seqfast']['median_s'])} | {r['ratio']:.2f}x | "
                     f"{r['ratio_min']:.2f}x - {r['ratio_max']:.2f}x | "
                     f"{results.fmt_mb(r['torch'].get('peak_bytes'))} | "
                     f"{results.fmt_mb(r['seqfast'].get('peak_bytes'))} |")
    return lines


def family_lines(rows):
    ok = [r for r in rows if "ratio" in r]
    lines = ["| family | cases | geomean speedup | worst | best |", "| --- | ---: | ---: | ---: | ---: |"]
    for fam in sorted({r["family"] for r in ok}):
        ratios = [r["ratio"] for r in ok if r["family"] == fam]
        lines.append(f"| {fam} | {len(ratios)} | {results.geomean(ratios):.2f}x | {min(ratios):.2f}x | "
                     f"{max(ratios):.2f}x |")
    all_ratios = [r["ratio"] for r in ok]
    if all_ratios:
        lines.append(f"| all | {len(all_ratios)} | {results.geomean(all_ratios):.2f}x | {min(all_ratios):.2f}x | "
                     f"{max(all_ratios):.2f}x |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small case per op, 3 rounds")
    parser.add_argument("-k", dest="filter", default=None, help="only cases whose name contains this (any case)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--round-time", type=float, default=0.04, help="seconds per implementation per round")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=None, help="folder for the .md, .png, summary.jsonl (default "
                        "benchmarks/results; with --quick a temporary folder)")
    args = parser.parse_args(argv)

    if args.out is None:  # a quick run checks the pipeline: its numbers stay out of the repository
        args.out = results.scratch_folder() if args.quick else results.RESULTS

    rounds = args.rounds or (3 if args.quick else 7)
    selected = [c for c in case_list.bench_cases(args.quick)
                if not args.filter or args.filter.lower() in c.name.lower()]
    m = machine_info.machine(args.device)
    stem = f"{m['device']}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    print("\n".join(["# seqfast vs torch eager"] + machine_info.header_lines(m)), flush=True)
    rows, start = [], time.perf_counter()
    cases_iter, write = results.progress(selected, "bench")
    for case in cases_iter:
        case_start = time.perf_counter()
        try:
            row = measure(case, args.device, rounds, args.round_time, not args.no_memory)
            write(f"{case.name:60s} {row['ratio']:5.2f}x  ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})")
        except Exception as e:  # one broken case must not lose the rest of the run
            row = dict(case=case.name, family=case.family, error=f"{type(e).__name__}: {str(e)[:200]}")
            write(f"{case.name:60s} ERROR {row['error']}")
        row["wall_s"] = round(time.perf_counter() - case_start, 2)  # the case's share of the run's time
        rows.append(row)
    elapsed = time.perf_counter() - start

    lines = ["# seqfast vs torch eager (`make bench`)", ""] + machine_info.header_lines(m) + [
        f"- {len(rows)} cases, {rounds} rounds each (3 for the slowest cases; {args.round_time:g} s per implementation "
        f"per round), "
        f"took {elapsed / 60:.1f} min", "",
        "Speedup = torch median time / seqfast median time (> 1: seqfast faster); round spread = min and max of the "
        "per-round ratios (each round times both). Peak MB: " +
        ("torch.cuda.max_memory_allocated over one call." if args.device == "cuda" else
         "resident-set high-water mark of a child process over one call (its first), above what its inputs hold (C++ "
         "allocations included)."), "", f"![speedup]({stem}.png)", ""] + family_lines(rows) + [""] + table(rows)
    os.makedirs(args.out, exist_ok=True)
    md = os.path.join(args.out, stem + ".md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    png = os.path.join(args.out, stem + ".png")
    results.plot(rows, png, f"seqfast vs torch eager: {m['cpu']}, {m['threads']} threads, torch {m['torch']} "
                 f"({m['device']}, {m['date'][:10]})")
    results.append_summary(m, "bench", rows, os.path.join(args.out, "summary.jsonl"))
    if not args.filter and not args.quick:  # the README shows the latest full run's plot and table under fixed names
        import shutil
        if os.path.exists(png):
            shutil.copyfile(png, os.path.join(args.out, f"latest-{m['device']}.png"))
        with open(os.path.join(args.out, f"latest-{m['device']}.md"), "w") as f:
            f.write("\n".join(lines).replace(f"]({stem}.png)", f"](latest-{m['device']}.png)") + "\n")
    raw = results.write_raw(stem, {"machine": m, "rows": rows})
    print("\n".join(family_lines(rows)))
    print(f"\n{md}\n{png}\nraw: {raw}\n{len(rows)} cases in {elapsed / 60:.1f} min")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
