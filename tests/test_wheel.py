"""The built wheel works in another project: installed into a fresh virtual environment (reusing the installed torch,
no network), tests/wheel_smoke.py run from a directory outside the repository imports seqfast from that
environment, with its C++ extension loaded.

Opt-in (building compiles the extension: minutes): SEQFAST_TEST_WHEEL=1. SEQFAST_WHEEL_DIR=<dir> uses the newest
seqfast-*.whl there (what `make wheel` left in dist/) instead of building one."""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.environ.get("SEQFAST_TEST_WHEEL") != "1",
                                reason="builds and installs the wheel: set SEQFAST_TEST_WHEEL=1 (make test-wheel)")


def _run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    given = os.environ.get("SEQFAST_WHEEL_DIR")
    if given:
        wheels = sorted(glob.glob(os.path.join(given, "seqfast-*.whl")), key=os.path.getmtime)
        assert wheels, f"no seqfast wheel in {given}"
        return Path(wheels[-1])
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", out, REPO]
    if shutil.which("flock"):  # one C++ build at a time on the shared machine (as the Makefile)
        cmd = ["flock", "/tmp/seqfast-build.lock"] + cmd
    _run(cmd, env=dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2")), timeout=1800)
    wheels = list(out.glob("seqfast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _fresh_env(root):
    """A virtual environment of its own that sees this environment's torch (and its dependencies) through a .pth
    line, without seqfast's source tree or editable install (.pth files in that directory are not processed)."""
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    python = root / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    torch_site = Path(torch.__file__).resolve().parents[1]
    extra = {str(torch_site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "_seqfast_test_torch.pth").write_text("\n".join(sorted(extra)) + "\n")
    return python


def test_wheel_installs_and_runs_outside_the_repo(wheel, tmp_path):
    python = _fresh_env(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel])
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    shutil.copy(REPO / "tests" / "wheel_smoke.py", workdir / "smoke.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["SEQFAST_REPO"] = str(REPO)
    result = _run([python, "smoke.py"], cwd=workdir, env=env, timeout=600)
    assert "wheel smoke OK" in result.stdout
    assert str((tmp_path / "venv").resolve()) in result.stdout  # imported from the fresh environment


def test_wheel_contents(wheel):
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("seqfast/_C") and n.endswith(".so") for n in names), "no compiled extension"
    for module in ("seqfast/__init__.py", "seqfast/patching.py", "seqfast/nn/rnn.py", "seqfast/kernels/__init__.py"):
        assert module in names, module
    assert not any(n.startswith(("tests/", "csrc/", "benchmarks/")) for n in names)
