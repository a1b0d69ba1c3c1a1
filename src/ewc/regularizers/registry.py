"""The registry of strategies: every regularizer as the runner, the command line, the configs and
the docs know it. Each method's module registers itself; :mod:`ewc.regularizers` imports every
method module, so the registry is complete as soon as the package is imported."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ewc.regularizers.base import Regularizer


@dataclass(frozen=True)
class Strategy:
    """A regularizer as the runner, the command line, the configs and the docs know it.

    Attributes:
        name: the strategy's name (``--strategy``, ``make_regularizer``).
        build: the class (or any callable ``build(model, lam=..., **options)``).
        generic_lam: the untuned fallback λ, used where a benchmark's protocol has none.
        options: constructor keywords the runner passes from the ``RunConfig`` fields of the
            same names (e.g. ``("fisher", "gamma")``).
        uses_data: ``consolidate`` reads the task's batches (so ``fisher_samples`` and the
            runner's output masks apply; the runner passes ``forward``).
        proximal: has ``proximal_step`` (``--penalty proximal``).
    """

    name: str
    build: Callable[..., Regularizer]
    generic_lam: float
    options: tuple[str, ...] = ()
    uses_data: bool = False
    proximal: bool = True

    @property
    def settings(self) -> tuple[str, ...]:
        """Every RunConfig field this strategy reads besides the common ones."""
        return ("lam", *self.options, *(("fisher_samples",) if self.uses_data else ()))


#: name -> :class:`Strategy`, in the order the package imports the methods.
REGULARIZERS: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to :data:`REGULARIZERS` (replacing one of the same name)."""
    REGULARIZERS[strategy.name] = strategy
    return strategy


def make_regularizer(name: str, model: nn.Module, **kwargs: Any) -> Regularizer:
    """Build a registered regularizer by name (:data:`REGULARIZERS`: ``"ewc"``,
    ``"online-ewc"``, ``"si"``, ``"mas"``, ``"l2"``, ``"kfac"``, ...); ``kwargs`` go to its
    constructor (``lam`` is required)."""
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; choose one of {', '.join(REGULARIZERS)}.")
    return REGULARIZERS[name].build(model, **kwargs)
