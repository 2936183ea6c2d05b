"""Eager calls of the differentiable custom ops without ``torch.library``'s Python autograd wrapper.

Each op stays a ``torch.library`` custom op, with its fake and its autograd formula registered, and that op
is what ``torch.compile``, ``opcheck``, fake / meta tensors, tensor subclasses and dispatch modes see. In plain
eager calls, the ones a training loop makes, the same implementation, ``setup_context`` and backward run
through an equivalent ``torch.autograd.Function`` instead.

Why: the wrapper costs more host time than the work around it. ``ppo_loss_fused``'s forward + backward took
337 µs of Python through the op against 187 µs through the Function (median of 7, this repository's CI CPU,
a [1, 4, 16] call with the C++ kernel replaced by a stub: ``benchmarks/host_overhead.py``); 75 µs of the
difference is ``torch._library.utils.fill_defaults``, which re-reads the 19-argument schema per argument. On
an H200, where the PPO step at micro-batch sizes (4096 x 50257 bf16: 1.6 ms against a ~0.2 ms kernel) is
bound by the host (benchmarks/results/nvidia-h200/NOTES.md, run 5), that time is the step's.

Same contract as the op: positional arguments (the op's defaults filled in, as its dispatcher does before
``setup_context``), the same outputs, ``needs_input_grad`` per input, ``mark_non_differentiable`` and
``set_materialize_grads`` from ``setup_context``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def needs_the_op(args: tuple) -> bool:
    """Whether this call must go through the registered op: compiling or tracing, a dispatch mode active
    (``FakeTensorMode``, ``FlopCounterMode``, ...), or a tensor that is not a plain tensor with storage
    (a subclass such as ``DTensor``, a fake, functional or meta tensor)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    # fake and functional tensors are subclasses (FakeTensor, FunctionalTensor); C++ functionalization
    # wraps plain ones
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or a.is_meta or torch._is_functional_tensor(a)):
            return True
    return False


def eager_autograd(op: Callable, impl: Callable, backward: Callable, setup_context: Callable) -> Callable:
    """Register ``backward`` / ``setup_context`` as ``op``'s autograd formula and return the function to call.

    ``op``: the custom op (``torch.library.custom_op(...)(impl)``); ``impl``: its Python implementation. The
    returned callable takes the op's arguments positionally and runs ``op`` where ``needs_the_op`` says so,
    else ``impl`` inside a ``torch.autograd.Function`` with the same ``setup_context`` and ``backward``.
    """
    op.register_autograd(backward, setup_context=setup_context)
    params = list(inspect.signature(impl).parameters.values())
    defaults = tuple(p.default for p in params)
    n_params = len(params)
    name = getattr(impl, "__name__", "op").lstrip("_")

    def forward(*args: Any):
        # Varargs, not impl itself: with a separate setup_context, Function.apply binds forward's signature on every
        # call (inspect.signature and bind: ~50 µs for a 19-parameter op on the CI CPU, more than the rest of
        # apply), and `call` below has filled in the defaults already. The signature is precomputed too
        # (inspect.signature returns a function's __signature__ as it is).
        return impl(*args)

    forward.__signature__ = inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)])

    # forward without ctx and a separate setup_context: the form torch.func transforms (grad, vjp) accept
    function = type(f"Eager_{name}", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })

    def call(*args: Any):
        if len(args) < n_params:  # the op's defaults, as its dispatcher fills them in before setup_context
            args = args + defaults[len(args):]
        if needs_the_op(args):
            return call.op(*args)
        return function.apply(*args)

    call.op = op  # the registered op, for opcheck and tests
    return call


def eager_call(op: Callable, impl: Callable) -> Callable:
    """The function a backward calls for ``op``, a registered custom op without an autograd formula (a backward's
    kernels), whose Python implementation is ``impl``: ``impl`` itself in an eager backward, ``op`` where
    ``needs_the_op`` says so or while a graph of the backward is recorded (``create_graph=True``, where ``op``
    refuses a double backward by name).

    Why: the op's Python dispatch (``torch.library``'s autograd and backend wrappers and ``torch._dynamo``'s
    disable guard) took about half of an eager ``logprobs`` backward's host time on the CI CPU, around a kernel
    call of a few µs; an eager backward gains nothing from it.
    """

    def call(*args: Any):
        if torch.is_grad_enabled() or needs_the_op(args):
            return call.op(*args)
        return impl(*args)

    call.op = op  # the registered op, for tests
    return call
