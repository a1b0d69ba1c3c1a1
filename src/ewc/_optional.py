"""Optional dependencies: imported on first use, with an error that names the extra to install.

``pip install ewc`` needs torch and numpy only; plots, the CLI's config files, the offline
digits benchmark, progress bars and the trainer integrations live in extras (pyproject.toml).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: extra -> what it brings, for the error message.
EXTRAS = {
    "plots": "plots and the HTML report (matplotlib)",
    "cli": "the command line's YAML configs and progress bars (ruamel.yaml, tqdm)",
    "digits": "the offline scikit-learn digits benchmarks (scikit-learn)",
    "hf": "the Hugging Face Trainer callback (transformers, peft)",
    "trl": "TRL's trainers with the callbacks (trl, datasets)",
    "lightning": "the Lightning callback (lightning)",
    "tensorboard": "TensorBoard event files (tensorboard)",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` to run."""


class MissingExtraWarning(UserWarning):
    """An optional output is skipped because its extra is missing (TensorBoard event files)."""


def require(module: str, extra: str, instead: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``pip install 'ewc[extra]'``
    (and ``instead``, a way to do without it, e.g. ``"pass --no-report"``)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the module is there but one of its own imports failed: show that error
        raise MissingExtraError(
            f"{EXTRAS.get(extra, extra)} need the package providing {top!r}, which is not "
            f"installed. Install it with: pip install 'ewc[{extra}]' (or 'ewc[all]')"
            + (f", or {instead}." if instead else ".")
        ) from e
