"""`make bench`: runs the benchmark suite, keeps the raw JSON under benchmarks/results/, prints and saves the ratio
table. Extra arguments go to pytest (e.g. `-k lstm`)."""
import datetime
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    device = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.path.join(HERE, "results", f"{device}-{stamp}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", HERE, "-p", "no:cacheprovider", "-o", "python_files=bench_*.py",
           "--benchmark-only", "--benchmark-min-rounds=10", "--benchmark-max-time=0.5", "--benchmark-warmup=on",
           "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name", f"--benchmark-json={out}", "-q",
           "--rootdir", HERE, *sys.argv[1:]]
    rc = subprocess.call(cmd, cwd=HERE)
    if os.path.exists(out):
        _drop_round_data(out)
        sys.path.insert(0, HERE)
        from report import table
        text = table(out)
        print(text)
        with open(out[:-5] + ".md", "w") as f:
            f.write(text + "\n")
    return rc


def _drop_round_data(path):
    """Keep each benchmark's statistics, not every round's timing (tens of MB per run otherwise)."""
    import json
    with open(path) as f:
        data = json.load(f)
    for b in data["benchmarks"]:
        b["stats"].pop("data", None)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
