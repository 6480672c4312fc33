"""Whether autograd would record a module call: the question the no-grad fast paths ask before they run."""
import torch


def recorded(module, *tensors):
    """True when grad mode is on and one of the module's parameters, or one of ``tensors`` (tensors, tuples of them or
    None), requires grad: torch's output would then require grad, and the call must go through autograd. A frozen
    model (``requires_grad_(False)``) called without ``torch.no_grad()`` records nothing, and takes the same fast
    paths as a no-grad call."""
    if not torch.is_grad_enabled():
        return False
    for p in module._parameters.values():  # a loop, not any(): this runs on every training step of a module
        if p is not None and p.requires_grad:
            return True
    for t in tensors:
        if isinstance(t, (tuple, list)):
            if any(isinstance(u, torch.Tensor) and u.requires_grad for u in t):
                return True
        elif isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False
