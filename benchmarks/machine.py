"""What a benchmark ran on: CPU model (name, family/model numbers), its vector ISA flags, threads, torch and seqfast
versions, GPU. Written at the top of every results file: a ratio means little without the machine it came from."""
import datetime
import os
import subprocess

import torch

ISA_PREFIXES = ("avx2", "fma", "avx512", "amx", "avx_vnni")


def cpu_info():
    """The first processor of /proc/cpuinfo: model name, family/model/stepping, and its vector ISA flags."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough: the others repeat it
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = fields.get("flags", "").split()
    return {"model": fields.get("model name", "unknown"), "family": fields.get("cpu family", "?"),
            "model_number": fields.get("model", "?"), "stepping": fields.get("stepping", "?"),
            "isa": sorted(f for f in flags if f.startswith(ISA_PREFIXES))}


def native_bf16():
    """Whether the CPU computes in bfloat16 (AVX512_BF16 or AMX). Without it torch's bfloat16 RNN training is emulated
    and takes minutes at sizes that take milliseconds in float32, so the suites shrink their bfloat16 shapes."""
    return any(f in ("avx512_bf16", "amx_bf16") for f in cpu_info()["isa"])


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(device):
    cpu = cpu_info()
    import seqfast
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_tag(device),
        "cpu": cpu["model"],
        "cpu_family_model": f"family {cpu['family']} model {cpu['model_number']} stepping {cpu['stepping']}",
        "isa": cpu["isa"],
        "native_bf16": native_bf16(),
        "threads": torch.get_num_threads(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "seqfast": getattr(seqfast, "__version__", "?"),
        "commit": git_commit(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "caches": _kernel_caches(),
    }


def _kernel_caches():
    """The L2 and L3 sizes seqfast's CPU kernels read for their cache rules (bytes), or None without the extension."""
    from seqfast import _ext
    ext = _ext.module()
    return ext.cache_bytes() if ext is not None and hasattr(ext, "cache_bytes") else None


def device_tag(device):
    """'cpu', or the GPU's name made file-name safe (e.g. 'NVIDIA_H200')."""
    if device != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name()).strip("_")


def header_lines(m):
    """Markdown lines naming the machine and software of a run."""
    isa = ", ".join(m["isa"]) or "none of avx2/avx512/amx"
    lines = [f"- date: {m['date']}, device: {m['device']}" + (f" ({m['gpu']})" if m["gpu"] else ""),
             f"- CPU: {m['cpu']} ({m['cpu_family_model']}), ISA: {isa}; bfloat16 "
             + ("native" if m["native_bf16"] else "emulated (no avx512_bf16/amx: bfloat16 shapes shrunk)"),
             f"- threads: {m['threads']} torch threads, {m['usable_cpus']} usable CPUs"
             + (f"; caches the kernels read: L2 {m['caches']['l2'] >> 10} KB per core, L3 {m['caches']['l3'] >> 20} MB"
                if m.get("caches") else ""),
             f"- torch {m['torch']}, seqfast {m['seqfast']} at commit {m['commit']}"]
    return lines
