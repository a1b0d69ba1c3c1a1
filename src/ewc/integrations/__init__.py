"""EWC inside other people's training loops: trainer callbacks.

* :mod:`ewc.integrations.huggingface`: ``EWCCallback`` for ``transformers.Trainer``
  (``pip install 'ewc[hf]'``).
* :mod:`ewc.integrations.lightning`: ``EWCCallback`` for ``lightning.Trainer``
  (``pip install 'ewc[lightning]'``).

Both follow one contract: pass the same callback instance to the trainer of every task. When a
task's training ends it consolidates (importance and anchor of the task just learned) from that
trainer's training data, or from ``callback.data`` when set; in later tasks it adds the
penalty's gradient :math:`\\lambda\\bar F(\\theta-\\bar\\theta)` once per optimizer step. Only
the parameters with ``requires_grad=True`` when the first training starts are regularized (with
a PEFT model: the adapter and the other trainable modules, not the frozen base).

Each module also has a forgetting meter (``ForgettingMeterCallback`` / ``ForgettingMeter``):
the loss and accuracy on reference data every N steps, logged through the trainer's loggers;
:func:`reference_loss` measures them once.

Importing this package imports neither framework; each submodule imports its own.
"""

from ewc.integrations._continual import read_state
from ewc.integrations._meter import reference_loss

__all__ = ["read_state", "reference_loss"]
