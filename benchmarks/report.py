"""Prints the torch/seqfast ratio table of a pytest-benchmark JSON file (benchmarks/run.py calls it).

Each benchmark group holds one case timed for both implementations in the same run; ratio = torch median / seqfast
median (> 1: seqfast is faster). The ratio of the minimum times is printed beside it: on a shared machine the
minimum is the least disturbed by other load, the median the more typical. Cases run as a PackedSequence and padded also get a padded/packed table."""
import json
import sys
from collections import defaultdict


def table(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    backends = {}
    for b in data["benchmarks"]:
        groups[b["group"]][b["params"]["impl"]] = b["stats"]["median"]
        groups[b["group"]][b["params"]["impl"] + "_min"] = b["stats"]["min"]
        if b["params"]["impl"] == "seqfast":
            backends[b["group"]] = b.get("extra_info", {}).get("backend", "?")
    info = data.get("seqfast", {})
    cpu = data["machine_info"].get("cpu", {}).get("brand_raw")
    lines = [f"# seqfast vs torch", "",
             f"torch {info.get('torch')}, {info.get('threads')} threads, CPU: {cpu}, GPU: {info.get('cuda_device')}, "
             f"run {data.get('datetime', '')[:19]}, raw: {path.rsplit('/', 1)[-1]}", "",
             "| case | torch median | seqfast median | seqfast backend | ratio torch/seqfast (median) | (min) |",
             "| --- | ---: | ---: | --- | ---: | ---: |"]
    for group in sorted(groups):
        g = groups[group]
        if "torch" in g and "seqfast" in g:
            lines.append(f"| {group} | {_fmt(g['torch'])} | {_fmt(g['seqfast'])} | {backends.get(group)} | "
                         f"{g['torch'] / g['seqfast']:.2f}x | {g['torch_min'] / g['seqfast_min']:.2f}x |")
    packed = [(grp, grp.replace(" packed ", " padded ")) for grp in sorted(groups) if " packed " in grp]
    if packed:
        lines += ["", "| packed vs padded (same sequences) | impl | padded | packed | ratio padded/packed |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for grp, pad in packed:
            for impl in ("torch", "seqfast"):
                if impl in groups[grp] and impl in groups.get(pad, {}):
                    a, b = groups[pad][impl], groups[grp][impl]
                    lines.append(f"| {grp.replace(' packed', '')} | {impl} | {_fmt(a)} | {_fmt(b)} | {a / b:.2f}x |")
    return "\n".join(lines)


def _fmt(seconds):
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


if __name__ == "__main__":
    print(table(sys.argv[1]))
