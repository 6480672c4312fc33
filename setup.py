"""Build seqfast: the Python package, the Triton kernels (kernels/ -> seqfast.kernels) and the C++ CPU extension
(csrc/ -> seqfast._C). Build with `pip install --no-build-isolation .` so the extension compiles against the torch
already installed (the wheel is tied to that torch version; see README)."""
import glob
import os

from setuptools import setup

from torch.utils.cpp_extension import BuildExtension, CppExtension

_HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(_HERE, "seqfast", "version.py")) as f:
        scope = {}
        exec(f.read(), scope)
        return scope["__version__"]


# csrc/ holds folders by area (cpu/, rnn/, attention/) plus bindings.cpp, the only translation unit that includes
# <torch/extension.h>; kernel files include ATen only, by paths relative to csrc/ ("cpu/gemm.h").
_sources = sorted(os.path.relpath(p, _HERE) for p in glob.glob(os.path.join(_HERE, "csrc", "**", "*.cpp"),
                                                               recursive=True))
# The kernels' parallel regions are `#pragma omp parallel` (csrc/cpu/team.h): without -fopenmp they silently run
# serially. At run time the libgomp.so.1 that torch already loaded serves both.
_cflags = ["-O3", "-std=c++17", "-fopenmp"]
_ldflags = ["-fopenmp"]
# `make test-asan`: the extension with AddressSanitizer + UBSan (vptr checks off: torch's type info lives in other
# libraries), frame pointers for readable reports.
if os.environ.get("SEQFAST_SANITIZE"):
    _san = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-omit-frame-pointer", "-g"]
    _cflags = ["-O1", "-std=c++17", "-fopenmp"] + _san
    _ldflags = _ldflags + _san

setup(
    name="seqfast",
    version=_version(),
    description="Fused LSTM/GRU/RNN and attention kernels (Triton on CUDA, C++ on CPU), drop-in for torch.nn",
    packages=["seqfast", "seqfast.functional", "seqfast.nn", "seqfast.ops", "seqfast.reference", "seqfast.kernels"],
    package_dir={"seqfast.kernels": "kernels"},
    ext_modules=[CppExtension("seqfast._C", _sources, include_dirs=[os.path.join(_HERE, "csrc")],
                               extra_compile_args={"cxx": _cflags}, extra_link_args=_ldflags)],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest>=7", "numpy<2.3"],
        "bench": ["matplotlib", "tqdm", "onnx", "onnxruntime"],
    },
    zip_safe=False,
)
