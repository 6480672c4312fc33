"""Peak memory of one implementation of a case.

CPU: the resident-set high-water mark (VmHWM) of a child process that builds the case and runs it, minus its resident
set just before the first call. A child, because the high-water mark only ever grows within a process and because
allocator caches and seqfast's C++ workspace pools would otherwise carry over between cases; RSS, because it counts
every allocation (the C++ extension's, MKL's, oneDNN's), not only torch's tensors. The children fork from a server
process that imported torch and seqfast but never ran an op (forking a process whose OpenMP threads have run hangs the
child). GPU: torch.cuda.max_memory_allocated over one call, in this process."""
import multiprocessing
import os
import sys

_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        here = os.path.dirname(os.path.abspath(__file__))
        if here not in sys.path:
            sys.path.insert(0, here)
        _CONTEXT.set_forkserver_preload(["torch", "seqfast", "cases"])
    return _CONTEXT


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _child(case, impl, calls, conn):
    try:
        step = case.build(impl, "cpu")
        before = _status("VmRSS:")
        for _ in range(calls):
            step()
        conn.send(_status("VmHWM:") - before)
    except Exception as e:  # reported by the parent next to the case
        conn.send(f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def peak_cpu(case, impl, calls=1, timeout=300):
    """Bytes by which `calls` calls of the case raise the child's resident set above what its inputs already hold;
    None where /proc is missing or the child failed."""
    if not os.path.exists("/proc/self/status"):
        return None
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(case, impl, calls, send))
    child.start()
    send.close()
    result = receive.recv() if receive.poll(timeout) else None
    child.join(10)
    if child.is_alive():
        child.kill()
        child.join()
    return result if isinstance(result, int) else None


def peak_cuda(step):
    import torch
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
