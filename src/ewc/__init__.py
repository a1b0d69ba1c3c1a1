"""ewc: Elastic Weight Consolidation and continual-learning baselines for PyTorch.

The small public API::

    import ewc
    F = ewc.fisher_diagonal(model, batches, kind="exact")   # {param name: tensor like the param}
    reg = ewc.EWC(model, lam=1e4)                            # also OnlineEWC, SI, MAS, L2, KFAC
    loss = task_loss + reg.penalty()                         # while training a task
    reg.consolidate(batches)                                 # after it
    reg.save_pretrained("fisher/")                           # importance file (safetensors)
    reg = ewc.EWC.from_pretrained(model, "fisher/", lam=1e4) # start from it as "task 0"

    result = ewc.run(ewc.RunConfig(benchmark="split-mnist", strategy="ewc"))
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ewc")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

from ewc.data import load_dataset, make_stream, stream_from_tensors
from ewc.fisher import fisher_diagonal
from ewc.importance_file import ImportanceFile, load_importance
from ewc.metrics import compute_metrics, summarize
from ewc.models import MLP, SimpleCNN
from ewc.regularizers import EWC, KFAC, L2, MAS, SI, OnlineEWC, Regularizer, make_regularizer
from ewc.results import load_results, save_results
from ewc.runner import RunConfig, compare, run, sweep

__all__ = [
    "EWC",
    "KFAC",
    "L2",
    "MAS",
    "MLP",
    "SI",
    "ImportanceFile",
    "OnlineEWC",
    "Regularizer",
    "RunConfig",
    "SimpleCNN",
    "__version__",
    "compare",
    "compute_metrics",
    "fisher_diagonal",
    "load_dataset",
    "load_importance",
    "load_results",
    "make_regularizer",
    "make_stream",
    "run",
    "save_results",
    "stream_from_tensors",
    "summarize",
    "sweep",
]
