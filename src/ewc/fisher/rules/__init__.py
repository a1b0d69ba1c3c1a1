r"""Per-layer rules: :math:`\sum_i g_i^2` for a module's direct parameters from what hooks saw.

A rule is a function ``rule(module, args, kwargs, grad_outputs, power=2) -> {param_name: Tensor}``:

- ``args``, ``kwargs``: the module's call (inputs with the samples along dim 0);
- ``grad_outputs``: a list of output-gradients :math:`\delta_k = \partial \sum_i
  \log p(y_i \mid x_i) / \partial\,\mathrm{output}` (or their weighted versions for the exact
  Fisher), one per backward pass, each shaped like the module's output;
- returns, for every trainable direct parameter (``recurse=False``), the sum over samples and
  passes of the per-sample gradient's elementwise ``power``,
  :math:`\sum_k \sum_i |\partial \ell_{k,i} / \partial\theta|^p`, shaped like the parameter:
  ``power=2`` (squares) for the Fisher, ``power=1`` (absolute values) for MAS.

Rules are found by module type through :func:`register_rule` (like Opacus' ``grad_sample``
registry); a subclass uses its base's rule only if it does not override ``forward``. Modules
without a rule use :func:`generic_rule`, a per-sample ``torch.func`` ``vjp``. A rule may omit the
``power`` argument: it then serves the Fisher only, and MAS uses :func:`generic_rule` for its
modules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ..persample import per_sample_grad_powers, power_of

Rule = Callable[..., dict[str, Tensor]]

_RULES: dict[type[nn.Module], Rule] = {}


def register_rule(*module_types: type[nn.Module]) -> Callable[[Rule], Rule]:
    """Decorator registering ``rule`` for ``module_types`` (replacing earlier rules)."""

    def decorate(rule: Rule) -> Rule:
        for module_type in module_types:
            _RULES[module_type] = rule
        return rule

    return decorate


def rule_for(module: nn.Module, power: int = 2) -> Rule | None:
    """The registered rule for ``module``'s type or nearest base, or ``None`` (use generic).

    For ``power`` other than 2, only a rule that takes a ``power`` argument qualifies."""
    cls = type(module)
    for base in cls.__mro__:
        if base in _RULES and cls.forward is base.forward:
            rule = _RULES[base]
            if power != 2 and "power" not in inspect.signature(rule).parameters:
                return None
            return rule
    return None


def generic_rule(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grad_outputs: list[Any],
    power: int = 2,
) -> dict[str, Tensor]:
    """Fallback for any module: ``vmap`` over samples of a ``vjp`` of ``functional_call``."""
    params: dict[str, Tensor] = {
        name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad
    }
    n = next(t for t in tree_leaves(grad_outputs[0]) if isinstance(t, Tensor)).shape[0]
    return per_sample_grad_powers(module, params, (args, kwargs), grad_outputs, int(n), power)


def layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The first positional argument, or ``input=``, of a layer call."""
    x = args[0] if args else kwargs["input"]
    assert isinstance(x, Tensor)
    return x


def sum_of_powers(tensors: list[Tensor], power: int = 2) -> Tensor:
    """Elementwise :math:`\\sum_k |t_k|^p` of equally shaped tensors (at least one)."""
    total = power_of(tensors[0], power)
    for t in tensors[1:]:
        if power == 2:
            total.addcmul_(t, t)  # no temporary: runs once per class for the exact Fisher
        else:
            total += t.abs()
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
    "power_of",
    "register_rule",
    "rule_for",
    "sum_of_powers",
    "trainable",
]
