"""Benchmark set-up: every case times torch and seqfast on the same inputs in the same run (pytest-benchmark), grouped
so that benchmarks/report.py can print torch/seqfast ratios. CUDA cases run only when CUDA is present."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton has nothing to time without a GPU; the interpreter is never benchmarked.
    os.environ.pop("TRITON_INTERPRET", None)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["seqfast"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


@pytest.fixture
def timed(benchmark):
    """benchmark(fn) with CUDA synchronisation, so GPU timings cover the kernels, not their launch."""
    def run(fn, device):
        if device == "cuda":
            def fn_sync():
                fn()
                torch.cuda.synchronize()
            return benchmark(fn_sync)
        return benchmark(fn)
    return run
