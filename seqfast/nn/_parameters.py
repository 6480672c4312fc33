"""Reading a module's parameters by name on the forward path."""


def parameters_named(module, names):
    """The parameters ``names`` of ``module``, read from its parameter dict as Module.__getattr__ would (a decoder
    calls a cell per step, and a Module.__getattr__ per weight costs as much as a small cell's kernel). A
    parametrization (torch.nn.utils.parametrize) or an old-style weight_norm moves a weight out of that dict: the
    attribute serves then. A parameter registered as None (bias=False) reads as None."""
    params = module._parameters
    try:
        return [params[name] for name in names]
    except KeyError:
        return [getattr(module, name) for name in names]
