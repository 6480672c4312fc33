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
    """benchmark(fn) with CUDA synchronisation, so GPU timings cover the kernels, not their launch.
    rounds: a fixed round count for slow cases (one warm-up round first)."""
    import seqfast._backend as backend

    def run(fn, device, rounds=None):
        benchmark.extra_info["backend"] = backend.select(torch.device(device), torch.float32)
        call = fn
        if device == "cuda":
            def call():
                fn()
                torch.cuda.synchronize()
        if rounds:
            return benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)
        return benchmark(call)
    return run
