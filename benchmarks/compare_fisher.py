"""Our diagonal Fisher against the reference libraries, side by side: time, ratio, agreement.

Runs ``ewc.fisher.fisher_diagonal`` and every reference library that is importable (BackPACK,
nngeometry, Opacus, curvlinops: ``pip install -e ".[bench]"``; this script installs nothing and
names the ones it skips) on the same models and data:

- the seed CNN (``ewc.models.SimpleCNN``: conv 32 -> conv 64 -> fc 768 -> 10) and an MLP
  784-400-400-10 (``ewc.models.MLP``), ReLU, in eval mode;
- random MNIST-shaped data (``[N, 1, 28, 28]`` uniform pixels, 10 classes, seed 0; the timing
  does not depend on the values), float32, in batches of ``--batch``.

Each kind is compared with what computes the same quantity (sum-reduced losses, divided by N):

- ``exact`` (:math:`\\sum_c p_c g_c^2`): BackPACK ``DiagGGNExact``, nngeometry
  ``FIM(variant="classif_logits")`` with ``PMatDiag``;
- ``empirical`` (true labels): BackPACK ``SumGradSquared``, BackPACK ``BatchGrad`` squared and
  summed, Opacus ``GradSampleModule`` (``grad_sample`` squared and summed);
- ``sampled`` (one label drawn per sample): BackPACK ``DiagGGNMC(mc_samples=1)``, nngeometry
  ``FIM_MonteCarlo(trials=1)``; other random draws than ours, so timed only;
- ``kfac`` (Kronecker factors, exact): curvlinops ``KFACLinearOperator(fisher_type="type-2")``
  against ``ewc.KFAC``'s factors (its ``_factors``): the input factor A and the output-gradient
  factor G of every layer, curvlinops' G (a sum over samples) divided by N.

Agreement is checked first, in float64 on the first ``--check-samples`` samples: the largest
difference relative to each tensor's largest entry, over all parameters (the issue's bar is 1e-5).
Then every implementation runs ``--repeats`` times over ``--samples`` samples, interleaved
(ours, then each reference, repeat), and the table gives the median seconds and each median
as a multiple of ours (> 1: ours is faster).

    python benchmarks/compare_fisher.py [--samples 2000] [--batch 128] [--repeats 5]
        [--threads 1] [--models cnn,mlp] [--kinds exact,empirical,sampled,kfac]
        [--skip Opacus,BatchGrad]  (leave out references by a word of their label)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import ewc
from ewc.fisher import fisher_diagonal
from ewc.models import MLP, SimpleCNN

Batches = list[tuple[Tensor, Tensor]]
Fisher = Callable[[nn.Module, Batches], dict[str, Tensor]]  # model, batches -> mean per param
REFERENCES = ("backpack", "nngeometry", "opacus", "curvlinops")  # importable module names
MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn": SimpleCNN,
    "mlp": lambda: MLP(784, 10, (400, 400)),
}


def ours(kind: str) -> Fisher:
    def run(model: nn.Module, batches: Batches) -> dict[str, Tensor]:
        return fisher_diagonal(model, batches, kind)

    return run


def backpack(extension: str, attribute: str) -> Fisher:
    """BackPACK's ``extension`` on a sum-reduced cross-entropy; ``attribute`` is the per-
    parameter result (``grad_batch``: per-sample gradients, squared and summed here)."""
    import backpack as bp
    from backpack import extensions

    def run(model: nn.Module, batches: Batches) -> dict[str, Tensor]:
        extended = bp.extend(model)
        loss_fn = bp.extend(nn.CrossEntropyLoss(reduction="sum"))
        make = getattr(extensions, extension)
        sums = {n: torch.zeros_like(p) for n, p in extended.named_parameters()}
        for x, y in batches:
            loss = loss_fn(extended(x), y)
            with bp.backpack(make()):
                loss.backward()
            for n, p in extended.named_parameters():
                value = getattr(p, attribute)
                sums[n] += value.square().sum(0) if attribute == "grad_batch" else value
                p.grad = None
        return _mean(sums, batches)

    return run


def opacus_grad_sample(model: nn.Module, batches: Batches) -> dict[str, Tensor]:
    """Opacus' per-sample gradients of a sum-reduced cross-entropy, squared and summed."""
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, loss_reduction="sum")
    wrapped.train()  # Opacus records activations in training mode only (no dropout/BN here)
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in batches:
        nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
        for n, p in model.named_parameters():
            sums[n] += p.grad_sample.square().sum(0)
            p.grad, p.grad_sample = None, None
    wrapped._close()
    return _mean(sums, batches)


def nngeometry_fim(sampled: bool) -> Fisher:
    """nngeometry's diagonal FIM (closed form over classes, or one sampled label)."""
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatDiag, PVector

    def run(model: nn.Module, batches: Batches) -> dict[str, Tensor]:
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        loader = DataLoader(TensorDataset(x, y), batch_size=len(batches[0][1]))
        layers = LayerCollection.from_model(model)
        helper = FIM_MonteCarlo if sampled else FIM
        diag = helper(model, loader, PMatDiag, layer_collection=layers).get_diag()
        out = {}
        for layer, (w, b) in PVector(layers, vector_repr=diag).to_dict().items():
            out[f"{layer}.weight"], out[f"{layer}.bias"] = w, b
        return out

    return run


def _mean(sums: dict[str, Tensor], batches: Batches) -> dict[str, Tensor]:
    n = sum(len(y) for _, y in batches)
    return {name: s / n for name, s in sums.items()}


def kfac_ours(model: nn.Module, batches: Batches) -> dict[str, Tensor]:
    """``ewc.KFAC``'s exact Kronecker factors per layer: ``{layer}.A`` (inputs, with the bias
    column) and ``{layer}.G`` (output-gradients), each a mean over samples."""
    reg = ewc.KFAC(model, 1.0, fisher="exact")
    factors = reg._factors(batches)
    return {
        f"{layer.name}.{which}": f
        for layer, pair in zip(reg._layers, factors, strict=True)
        for which, f in zip("AG", pair, strict=True)
    }


def kfac_curvlinops(model: nn.Module, batches: Batches) -> dict[str, Tensor]:
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    op = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        params,
        batches,
        fisher_type="type-2",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    n = sum(len(y) for _, y in batches)
    out = {}
    for layer in op._input_covariances:
        out[f"{layer}.A"] = op._input_covariances[layer]
        out[f"{layer}.G"] = op._gradient_covariances[layer] / n  # a sum over samples there
    return out


def implementations(kind: str, available: set[str], skip: list[str]) -> dict[str, Fisher]:
    """``{label: fisher}``: ours first, then the importable references for ``kind`` whose label
    contains none of ``skip``."""
    table: dict[str, tuple[str, Fisher]] = {}
    if kind == "exact":
        table = {
            "BackPACK DiagGGNExact": ("backpack", backpack("DiagGGNExact", "diag_ggn_exact")),
            "nngeometry FIM PMatDiag": ("nngeometry", nngeometry_fim(sampled=False)),
        }
    elif kind == "empirical":
        table = {
            "BackPACK SumGradSquared": ("backpack", backpack("SumGradSquared", "sum_grad_squared")),
            "BackPACK BatchGrad, squared": ("backpack", backpack("BatchGrad", "grad_batch")),
            "Opacus GradSampleModule, squared": ("opacus", opacus_grad_sample),
        }
    elif kind == "sampled":
        table = {
            "BackPACK DiagGGNMC": ("backpack", backpack("DiagGGNMC", "diag_ggn_mc")),
            "nngeometry FIM_MonteCarlo PMatDiag": ("nngeometry", nngeometry_fim(sampled=True)),
        }
    elif kind == "kfac":
        table = {"curvlinops KFACLinearOperator type-2": ("curvlinops", kfac_curvlinops)}
    first: dict[str, Fisher] = {"ewc (ours)": kfac_ours if kind == "kfac" else ours(kind)}
    return first | {
        label: f
        for label, (lib, f) in table.items()
        if lib in available and not any(word in label for word in skip)
    }


def data(n: int, batch: int, dtype: torch.dtype) -> Batches:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[s : s + batch], y[s : s + batch]) for s in range(0, n, batch)]


def disagreement(got: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """Largest |got - reference| relative to the reference's largest entry, over tensors."""
    if set(got) != set(reference):
        raise ValueError(f"different parameters: {sorted(got)} against {sorted(reference)}")
    return max(float((got[n] - reference[n]).abs().max() / reference[n].abs().max()) for n in got)


def fresh(name: str, dtype: torch.dtype) -> nn.Module:
    """Model ``name`` with seed-0 weights in ``dtype``, eval mode (a new copy each call, so a
    library's hooks never reach another's run)."""
    torch.manual_seed(0)
    return MODELS[name]().to(dtype).eval()


def compare(name: str, kind: str, available: set[str], args: argparse.Namespace) -> list[list[str]]:
    """Table rows for one model and kind: check agreement, then time interleaved."""
    impls = implementations(kind, available, [w for w in args.skip.split(",") if w])
    check = data(args.check_samples, args.batch, torch.float64)
    agree = {}
    torch.set_default_dtype(torch.float64)  # for tensors a library makes itself (nngeometry)
    try:
        reference = impls["ewc (ours)"](fresh(name, torch.float64), check)
        for label, f in list(impls.items())[1:]:
            got = f(fresh(name, torch.float64), check)
            agree[label] = (
                "other draws" if kind == "sampled" else f"{disagreement(got, reference):.1e}"
            )
    finally:
        torch.set_default_dtype(torch.float32)
    batches = data(args.samples, args.batch, torch.float32)
    models = {label: fresh(name, torch.float32) for label in impls}
    for label, f in impls.items():  # warm-up, on the same copies that are timed
        f(models[label], batches[:2])
    times: dict[str, list[float]] = {label: [] for label in impls}
    for _ in range(args.repeats):
        for label, f in impls.items():
            tic = time.perf_counter()
            f(models[label], batches)
            times[label].append(time.perf_counter() - tic)
    medians = {label: statistics.median(t) for label, t in times.items()}
    ref = medians["ewc (ours)"]
    return [
        [
            name,
            kind,
            label,
            f"{secs:.3f}",
            f"{secs / ref:.2f}",
            agree.get(label, ""),
        ]
        for label, secs in medians.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000, help="samples timed (float32)")
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see docs)")
    parser.add_argument("--check-samples", type=int, default=256, help="float64 agreement")
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated: cnn, mlp")
    parser.add_argument(
        "--kinds", default="exact,empirical,sampled,kfac", help="exact, empirical, sampled, kfac"
    )
    parser.add_argument(
        "--skip", default="", help="leave out references whose label contains one of these"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    available = {lib for lib in REFERENCES if importlib.util.find_spec(lib)}
    missing = sorted(set(REFERENCES) - available)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs "
        f"({platform.machine()}), load average {os.getloadavg()[0]:.1f}; {args.samples} samples, "
        f"batch {args.batch}, float32; median of {args.repeats} interleaved repeats; agreement "
        f"in float64 on {args.check_samples} samples"
    )
    if missing:
        print(f"skipped (not importable): {', '.join(missing)}; pip install -e '.[bench]'")
    rows = []
    for name in args.models.split(","):
        for kind in args.kinds.split(","):
            rows += compare(name, kind, available, args)
            print(f"  done: {name} {kind} ({time.strftime('%H:%M:%S')})", flush=True)
    print()
    print("| model | Fisher | implementation | seconds | × ours | max rel. difference (float64) |")
    print("|---|---|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
