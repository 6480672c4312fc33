"""Prints the torch/seqfast ratio table of a pytest-benchmark JSON file (benchmarks/run.py calls it).

Each benchmark group holds one case timed for both implementations in the same run; ratio = torch median / seqfast
median (> 1: seqfast is faster)."""
import json
import sys
from collections import defaultdict


def table(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["params"]["impl"]] = b["stats"]["median"]
    info = data.get("seqfast", {})
    lines = [f"# seqfast vs torch ({path})", "",
             f"torch {info.get('torch')}, {info.get('threads')} threads, CPU: {data['machine_info'].get('cpu', {}).get('brand_raw')}, "
             f"GPU: {info.get('cuda_device')}, date {data.get('datetime', '')[:10]}", "",
             "| case | torch median | seqfast median | ratio torch/seqfast |", "| --- | ---: | ---: | ---: |"]
    for group in sorted(groups):
        g = groups[group]
        if "torch" in g and "seqfast" in g:
            lines.append(f"| {group} | {_fmt(g['torch'])} | {_fmt(g['seqfast'])} | {g['torch'] / g['seqfast']:.2f}x |")
    return "\n".join(lines)


def _fmt(seconds):
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


if __name__ == "__main__":
    print(table(sys.argv[1]))
