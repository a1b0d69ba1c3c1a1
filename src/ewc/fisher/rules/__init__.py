r"""Per-layer rules: :math:`\sum_i g_i^2` for a module's direct parameters from what hooks saw.

A rule is a function ``rule(module, args, kwargs, grad_outputs) -> {param_name: Tensor}``:

- ``args``, ``kwargs``: the module's call (inputs with the samples along dim 0);
- ``grad_outputs``: a list of output-gradients :math:`\delta_k = \partial \sum_i
  \log p(y_i \mid x_i) / \partial\,\mathrm{output}` (or their weighted versions for the exact
  Fisher), one per backward pass, each shaped like the module's output;
- returns, for every trainable direct parameter (``recurse=False``), the sum over samples and
  passes of the squared per-sample gradient, :math:`\sum_k \sum_i (\partial \ell_{k,i} /
  \partial\theta)^2`, shaped like the parameter.

Rules are found by module type through :func:`register_rule` (like Opacus' ``grad_sample``
registry); a subclass uses its base's rule only if it does not override ``forward``. Modules
without a rule use :func:`generic_rule`, a per-sample ``torch.func`` ``vjp``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ..persample import per_sample_sq_grads

Rule = Callable[[Any, tuple[Any, ...], dict[str, Any], list[Any]], dict[str, Tensor]]

_RULES: dict[type[nn.Module], Rule] = {}


def register_rule(*module_types: type[nn.Module]) -> Callable[[Rule], Rule]:
    """Decorator registering ``rule`` for ``module_types`` (replacing earlier rules)."""

    def decorate(rule: Rule) -> Rule:
        for module_type in module_types:
            _RULES[module_type] = rule
        return rule

    return decorate


def rule_for(module: nn.Module) -> Rule | None:
    """The registered rule for ``module``'s type or nearest base, or ``None`` (use generic)."""
    cls = type(module)
    for base in cls.__mro__:
        if base in _RULES and cls.forward is base.forward:
            return _RULES[base]
    return None


def generic_rule(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], grad_outputs: list[Any]
) -> dict[str, Tensor]:
    """Fallback for any module: ``vmap`` over samples of a ``vjp`` of ``functional_call``."""
    params: dict[str, Tensor] = {
        name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad
    }
    n = next(t for t in tree_leaves(grad_outputs[0]) if isinstance(t, Tensor)).shape[0]
    return per_sample_sq_grads(module, params, (args, kwargs), grad_outputs, int(n))


def layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The first positional argument, or ``input=``, of a layer call."""
    x = args[0] if args else kwargs["input"]
    assert isinstance(x, Tensor)
    return x


def sum_of_squares(tensors: list[Tensor]) -> Tensor:
    """Elementwise :math:`\\sum_k t_k^2` of equally shaped tensors (at least one)."""
    total = tensors[0].square()
    for t in tensors[1:]:
        total.addcmul_(t, t)
    return total


def trainable(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is a parameter that requires grad."""
    p = getattr(module, name, None)
    return isinstance(p, Tensor) and p.requires_grad


# Importing the rule modules registers them.
from . import conv, embedding, linear, norm  # noqa: E402

__all__ = [
    "Rule",
    "conv",
    "embedding",
    "generic_rule",
    "layer_input",
    "linear",
    "norm",
    "register_rule",
    "rule_for",
    "sum_of_squares",
    "trainable",
]
