"""The kernels' memory pool survives fork(): its lock is held across the fork and released in both processes
(pthread_atfork), so a child forked while another thread uses the pool can still run kernels (before, a fork at the
wrong moment left the child's copy of the lock held forever: the child hung at its first pooled allocation)."""
import os
import signal
import threading

import pytest
import torch

from seqfast import _ext

_C = _ext.module()
pytestmark = [pytest.mark.skipif(_C is None, reason="seqfast._C not built"),
              pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")]


def _pooled_inputs():
    # workspaces above 1 MiB come from the pool: [T*B, 4H] gates and cell states of an LSTM layer
    T, B, H = 16, 32, 256
    return (torch.randn(T * B, 8), torch.full((T,), B, dtype=torch.long), torch.zeros(B, H), torch.zeros(B, H),
            torch.randn(4 * H, 8) * 0.1, torch.randn(4 * H, H) * 0.1, None, None, False)


def _pooled_work(inputs):
    # inputs made once, before any thread starts: torch.randn takes the default generator's lock, and a fork while
    # another thread holds it would hang the child in torch, whatever the pool does
    return _C.lstm_layer_forward(*inputs)[0]


def test_fork_while_another_thread_uses_the_pool():
    stop = threading.Event()
    inputs = _pooled_inputs()

    def hammer():
        while not stop.is_set():
            _pooled_work(inputs)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        for _ in range(12):
            pid = os.fork()
            if pid == 0:  # child: one pooled kernel call, then leave without running Python's cleanup
                signal.alarm(20)
                try:
                    torch.set_num_threads(1)  # no OpenMP team in the child: libgomp's pool does not survive fork()
                    _pooled_work(inputs)
                    os._exit(0)
                except BaseException:
                    os._exit(2)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
    finally:
        stop.set()
        t.join()
