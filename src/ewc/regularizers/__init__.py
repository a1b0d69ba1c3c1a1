r"""Penalties against forgetting behind one protocol: EWC, online EWC, SI, MAS, L2 and K-FAC.

Every regularizer keeps, per trainable parameter, an importance and an anchor, and adds to the
task loss :math:`\tfrac{\lambda}{2}\sum_i \bar\Omega_i(\theta_i - \bar\theta_i)^2` (the math,
the λ convention and how tasks merge: :mod:`ewc.regularizers.base`). Usage, the same for all
of them (``reg`` is any :class:`Regularizer`)::

    reg = EWC(model, lam=...)       # or OnlineEWC, SI, MAS, L2, KFAC, make_regularizer(...)
    for task in tasks:
        for batch in task:
            loss = task_loss(model, batch) + reg.penalty()   # autograd path, or ...
            optimizer.zero_grad()
            loss.backward()
            # ... the closed-form path instead of penalty(): p.grad += λ Ω̄ (p - θ̄)
            # reg.add_penalty_grad()
            optimizer.step()
            reg.after_step()                  # EVERY step: SI integrates its path here
        reg.consolidate(batches)              # end of the task: importance + anchor

One module per method, each ending with its registration in :data:`REGULARIZERS`:

* :mod:`~ewc.regularizers.ewc`: :class:`EWC` / :class:`OnlineEWC` (Kirkpatrick et al., PNAS
  2017; Schwarz et al. 2018), the diagonal Fisher (:func:`ewc.fisher.fisher_diagonal`);
* :mod:`~ewc.regularizers.si`: :class:`SI` (Zenke, Poole & Ganguli, ICML 2017), the path
  integral of the loss decrease;
* :mod:`~ewc.regularizers.mas`: :class:`MAS` (Aljundi et al., ECCV 2018), per-sample
  :math:`|\partial\|f(x)\|_2^2/\partial\theta|`;
* :mod:`~ewc.regularizers.l2`: :class:`L2`, :math:`\Omega = 1`;
* :mod:`~ewc.regularizers.kfac`: :class:`KFAC` (Ritter et al., NeurIPS 2018), Kronecker factors.

A new method is one new module (a class with the protocol, usually a
:class:`QuadraticRegularizer` with its ``task_importance``, and one ``register(Strategy(...))``
call at its end) and one import line below; the runner, the command line and the configs derive
from the registry.
"""

from ewc.regularizers.base import QuadraticRegularizer, Regularizer
from ewc.regularizers.checks import MODES
from ewc.regularizers.registry import REGULARIZERS, Strategy, make_regularizer, register

# The methods, one line each, in the order the command line lists them; each module ends by
# registering its strategies in REGULARIZERS.
# isort: off
from ewc.regularizers.ewc import EWC, OnlineEWC
from ewc.regularizers.si import SI
from ewc.regularizers.mas import MAS
from ewc.regularizers.l2 import L2
from ewc.regularizers.kfac import KFAC
# isort: on

__all__ = [
    "EWC",
    "KFAC",
    "L2",
    "MAS",
    "MODES",
    "REGULARIZERS",
    "SI",
    "OnlineEWC",
    "QuadraticRegularizer",
    "Regularizer",
    "Strategy",
    "make_regularizer",
    "register",
]
