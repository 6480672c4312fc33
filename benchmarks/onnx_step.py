"""ONNX Runtime on the same module: torch.onnx.export (the TorchScript exporter, which maps nn.LSTM/GRU/RNN onto
ONNX's native recurrent ops) and an InferenceSession with as many intra-op threads as torch uses. Optional: callers
check available() and note the skip."""
import io
import warnings

import torch


def available():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        return True
    except ImportError:
        return False


def _flatten(inputs):
    for x in inputs:
        if isinstance(x, (tuple, list)):
            yield from _flatten(x)
        elif x is not None:
            yield x


def onnx_step(module, inputs):
    """A zero-argument callable running `module(*inputs)` in ONNX Runtime (inference only)."""
    import onnxruntime
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), tuple(inputs), buffer, dynamo=False, opset_version=17)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    arrays = [x.detach().numpy() for x in _flatten(inputs)]
    feed = dict(zip(names, arrays[:len(names)]))  # the exporter may drop inputs the graph does not read
    return lambda: session.run(None, feed)
