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


# bindings.cpp is the only translation unit that includes <torch/extension.h>; kernel files include ATen only.
_sources = sorted(os.path.relpath(p, _HERE) for p in glob.glob(os.path.join(_HERE, "csrc", "*.cpp")))
# at::parallel_for is a header template built on `#pragma omp parallel`: without -fopenmp it silently runs serially.
# At run time the libgomp.so.1 that torch already loaded serves both.
_cflags = ["-O3", "-std=c++17", "-fopenmp"]

setup(
    name="seqfast",
    version=_version(),
    description="Fused LSTM/GRU/RNN and attention kernels (Triton on CUDA, C++ on CPU), drop-in for torch.nn",
    packages=["seqfast", "seqfast.functional", "seqfast.nn", "seqfast.ops", "seqfast.reference", "seqfast.kernels"],
    package_dir={"seqfast.kernels": "kernels"},
    ext_modules=[CppExtension("seqfast._C", _sources, extra_compile_args={"cxx": _cflags},
                               extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest>=7", "numpy<2.3"],
        "bench": ["pytest-benchmark>=4"],
    },
    zip_safe=False,
)
