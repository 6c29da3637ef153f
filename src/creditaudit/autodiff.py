"""Derivatives with respect to states, for rules that take them inside ``credits``: one call that
works for one run and for a stack of runs (``training/stack.py``, where ``torch.func.vmap`` adds a run
axis around the rule's code and ``torch.autograd.grad`` cannot reach the batched tensors).

:func:`vjp` is ``torch.func.vjp`` under a ``torch.func`` transform, and plain autograd otherwise:
the two compute the same numbers (the same backward kernels), and in eager mode plain autograd
costs a little less (EP's credits alone, resmlp, one CPU thread: 77–82 ms against 85–88 ms with
``torch.func.vjp``; within the noise of a whole training step). Parameters are
constants: only the primals get a derivative, no parameter ``.grad`` is touched and the outputs
carry no graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import overload

import torch
from torch import Tensor


def under_transform() -> bool:
    """True inside a ``torch.func`` transform (vmap, grad, vjp, jvp)."""
    return torch._C._functorch.maybe_current_level() is not None


Pullback = Callable[..., tuple[Tensor, ...]]


@overload
def vjp(fn: Callable[..., Tensor], *primals: Tensor) -> tuple[Tensor, Pullback]: ...
@overload
def vjp(
    fn: Callable[..., tuple[Tensor, ...]], *primals: Tensor
) -> tuple[tuple[Tensor, ...], Pullback]: ...
def vjp(
    fn: Callable[..., Tensor | tuple[Tensor, ...]], *primals: Tensor
) -> tuple[Tensor | tuple[Tensor, ...], Pullback]:
    """``(fn(*primals), pullback)`` with ``pullback(cotangents)`` the vector-Jacobian products with
    respect to ``primals`` (``cotangents`` shaped like the outputs: one tensor, or a tuple). The
    outputs and the products are detached."""
    if under_transform():
        with torch.no_grad():  # an outer graph would only record what nobody differentiates
            outs, pull = torch.func.vjp(fn, *primals)  # type: ignore[misc]  # torch's stub: 2 or 3 values, whatever has_aux
        return outs, lambda cotangents: _no_grad(pull, cotangents)
    inputs = [p.detach().requires_grad_(True) for p in primals]
    with torch.enable_grad():
        outs = fn(*inputs)
    flat: Sequence[Tensor] = outs if isinstance(outs, tuple) else (outs,)

    def pullback(cotangents: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        cts = cotangents if isinstance(cotangents, tuple) else (cotangents,)
        return torch.autograd.grad(flat, inputs, cts)

    detached = tuple(o.detach() for o in flat)
    return (detached if isinstance(outs, tuple) else detached[0]), pullback


def grad(fn: Callable[[Tensor], Tensor], primal: Tensor) -> Tensor:
    """d fn / d primal for a scalar ``fn``, detached."""
    out, pull = vjp(fn, primal)
    return pull(torch.ones_like(out))[0]


def _no_grad(pull: Pullback, cotangents: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    with torch.no_grad():
        return pull(cotangents)
