"""Adversarial inputs (inconsistent PackedSequence batch_sizes, NaN / Inf placement, wrong or broadcast mask shapes),
each group run in a child process (tests/adversarial_cases.py), so a crash or a hang fails this test instead of
killing the test run."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("group", ["packed_sequences", "sdpa_nan", "masks"])
def test_adversarial_group_in_child_process(group):
    env = dict(os.environ, TRITON_INTERPRET="1")
    try:
        run = subprocess.run([sys.executable, os.path.join(HERE, "adversarial_cases.py"), group], env=env,
                             capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{group}: hung (no exit within {exc.timeout} s); last output:\n{exc.stdout}")
    failures = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert run.returncode == 0 and not failures, (
        f"{group}: exit code {run.returncode} (negative: killed by signal {-run.returncode})\n"
        + "\n".join(failures) + f"\n{run.stderr[-3000:]}")
    assert run.stdout.count("\nok ") + run.stdout.startswith("ok ") > 0
