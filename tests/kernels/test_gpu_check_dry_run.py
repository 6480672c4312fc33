"""`make gpu-check` on a machine without CUDA is a dry run (Triton's interpreter, tiny shapes): it must finish,
cover every benchmark group and write its report, so the command is known to work before a GPU is lent."""
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, make gpu-check runs for real")
def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (report,) = tmp_path.glob("*.md")
    text = report.read_text()
    for section in ("## Cells", "## Sequences", "## SDPA", "## Decoder step", "**Dry run**"):
        assert section in text
    assert "FAILED" not in text
    assert text.count("| LSTM ") >= 2 and text.count("| forward") >= 2
