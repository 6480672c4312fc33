"""Where a run's results go: benchmarks/results/<stem>.md (the table), <stem>.png (plots), one line per case appended
to benchmarks/results/summary.jsonl (the history across runs), and the raw per-run JSON in a temporary folder (not
committed: the summary keeps what later runs are compared against)."""
import json
import math
import os
import tempfile

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SUMMARY = os.path.join(RESULTS, "summary.jsonl")


def fmt_time(seconds):
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def fmt_mb(nbytes):
    return "-" if nbytes is None else f"{nbytes / 2 ** 20:.1f}"


def geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def append_summary(machine, suite, rows, path=SUMMARY):
    """One JSON line per case of this run: date, device, CPU, case, torch / seqfast medians, ratio (and spread)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            if r.get("ratio") is None:
                continue
            f.write(json.dumps({
                "date": machine["date"], "suite": suite, "device": machine["device"], "cpu": machine["cpu"],
                "isa": " ".join(i for i in machine["isa"] if i.startswith(("avx512f", "avx512_bf16", "amx")) or
                                i == "avx2"),
                "threads": machine["threads"], "torch": machine["torch"], "commit": machine["commit"],
                "case": r["case"], "torch_median_s": r["torch"]["median_s"],
                "seqfast_median_s": r["seqfast"]["median_s"],
                "ratio": round(r["ratio"], 4), "ratio_min": round(r["ratio_min"], 4),
                "ratio_max": round(r["ratio_max"], 4)}) + "\n")


def scratch_folder():
    folder = os.path.join(tempfile.gettempdir(), "seqfast-bench")
    os.makedirs(folder, exist_ok=True)
    return folder


def write_raw(stem, payload):
    """The full per-run data, outside the repository."""
    path = os.path.join(scratch_folder(), stem + ".json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def progress(items, desc):
    """(iterable, print function): a tqdm bar where tqdm is installed (lines printed above the bar), else plain."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items, print
    return tqdm(items, desc=desc, unit="case", mininterval=2.0), tqdm.write


def plot(rows, path, title):
    """Top: each case's speedup by family (dots; whiskers: min / max of the per-round ratios; bar: the family's
    geomean). Bottom: the speedup against the case's size, one panel per family (its size axis named there)."""
    try:
        import matplotlib
    except ImportError:
        print(f"no plot ({path}): matplotlib is not installed (pip install -r requirements-bench.txt)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter
    as_ratio = FuncFormatter(lambda v, _: f"{v:g}x")
    rows = [r for r in rows if r.get("ratio")]
    families = sorted({r["family"] for r in rows})
    if not families:
        return
    colors = {f: plt.cm.tab10(i) for i, f in enumerate(families)}
    fig = plt.figure(figsize=(max(12, 3.2 * len(families)), 9))
    grid = fig.add_gridspec(2, len(families))
    top = fig.add_subplot(grid[0, :])
    for i, fam in enumerate(families):
        cases = [r for r in rows if r["family"] == fam]
        g = geomean([r["ratio"] for r in cases])
        top.bar(i, g, color=colors[fam], alpha=0.3, width=0.8)
        top.text(i, g, f"geomean {g:.2f}x", ha="center", va="bottom", fontsize=9)
        for j, r in enumerate(cases):
            x = i - 0.35 + 0.7 * (j + 0.5) / len(cases)
            top.errorbar(x, r["ratio"], yerr=[[r["ratio"] - r["ratio_min"]], [r["ratio_max"] - r["ratio"]]],
                         fmt="o", ms=3, color=colors[fam], elinewidth=0.7, capsize=0)
    top.axhline(1.0, color="k", lw=0.8, ls="--")
    top.set_yscale("log")
    top.yaxis.set_major_formatter(as_ratio)
    top.set_xticks(range(len(families)), families)
    top.set_ylabel("speedup (torch time / seqfast time)")
    top.set_title("speedup per family (bar: geomean; dots: cases; whiskers: spread over rounds)", fontsize=10)
    for i, fam in enumerate(families):
        ax = fig.add_subplot(grid[1, i])
        cases = [r for r in rows if r["family"] == fam and r.get("size")]
        ax.scatter([r["size"] for r in cases], [r["ratio"] for r in cases], color=colors[fam], s=14)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(as_ratio)
        ratios = [r["ratio"] for r in cases] or [1.0]
        narrow = max(ratios + [1.0]) / min(ratios + [1.0]) < 20  # label the 2x..9x ticks only where few are shown
        ax.yaxis.set_minor_formatter(as_ratio if narrow else NullFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(", ".join(sorted({r["size_label"] for r in cases})), fontsize=8)
        ax.set_title(f"{fam}: speedup against size", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
