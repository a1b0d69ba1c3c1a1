"""What :func:`ewc.runner.run` checks before the first step: every task has samples to train
and evaluate on, the model has parameters to train, and one forward of a few samples of the
first task gives one logit per output unit. A model error is named with the input's shape and
torch's message, before any training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ewc.data.datasets import to_float
from ewc.data.streams import Task, TaskStream
from ewc.fisher._util import eval_mode
from ewc.runner.config import RunConfig

#: Samples of the first task fed through the model by :func:`check_model`.
_PROBE = 2


def check_arguments(config: Any, stream: Any, model: Any) -> None:
    """Raise ``ValueError`` naming the argument of :func:`ewc.runner.run` that is not of its
    type: ``config`` a ``RunConfig``, ``stream`` a ``TaskStream`` or None, ``model`` an
    ``nn.Module`` or None."""
    wanted = (
        ("config", config, RunConfig, "ewc.RunConfig(...)"),
        ("stream", stream, TaskStream | None, "a TaskStream (ewc.data.stream_from_tensors)"),
        ("model", model, nn.Module | None, "a torch.nn.Module"),
    )
    for name, value, kind, what in wanted:
        if not isinstance(value, kind):
            raise ValueError(f"run(): {name} should be {what}, not {type(value).__name__}")


def check_tasks(tasks: Sequence[Task], eval_sets: Sequence[Any], evaluate_on: str) -> None:
    """Raise ``ValueError`` naming the first task without training samples, or without samples
    to evaluate on (``evaluate_on``: ``"test"`` or ``"val"``)."""
    for task, evaluated in zip(tasks, eval_sets, strict=True):
        if len(task.train.y) == 0:
            raise ValueError(
                f"task {task.name!r} has no training samples; give every task some, or leave "
                "it out of the stream"
            )
        if len(evaluated.y) == 0:
            raise ValueError(
                f"task {task.name!r} has no {evaluate_on} samples to measure accuracy on; give "
                "it some (an accuracy of 0 would be reported otherwise)"
            )


def check_model(model: nn.Module, stream: TaskStream, first: Tensor) -> None:
    """Raise ``ValueError`` if ``model`` has no trainable parameters, fails on ``first`` (a few
    inputs of the first task, on the model's device), or does not return logits
    ``[B, stream.n_outputs]``. Runs in eval mode without gradients: nothing changes."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"the model ({type(model).__name__}) has no trainable parameters "
            "(requires_grad=True): training would change nothing. Give a model with some."
        )
    x = to_float(first[:_PROBE])
    wanted = f"[B, {stream.n_outputs}] logits, one per output unit of the stream {stream.name!r}"
    try:
        with torch.no_grad(), eval_mode(model):
            output = model(x)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, IndexError, ValueError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"the model failed on a batch of the first task, inputs of shape {list(x.shape)} "
            f"(the stream's input_shape is {list(stream.input_shape)}): {message}. Give a model "
            f"that maps [B, *input_shape] to {wanted}."
        ) from e
    shape = list(output.shape) if isinstance(output, Tensor) else type(output).__name__
    if not isinstance(output, Tensor) or list(output.shape) != [len(x), stream.n_outputs]:
        raise ValueError(
            f"the model maps inputs of shape {list(x.shape)} to {shape}; the runner needs {wanted}."
        )
