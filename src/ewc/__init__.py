"""ewc: Elastic Weight Consolidation and continual-learning baselines for PyTorch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ewc")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
