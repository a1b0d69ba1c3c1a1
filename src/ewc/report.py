"""A self-contained HTML report, and a Markdown summary next to it, from results files.

The HTML file makes no request of its own: figures are embedded as base64 PNG, styles and the
one script are inline, and a Content-Security-Policy forbids anything else (``img-src data:``,
style and script allowed by hash only). The script only checks, on load, that every figure
decoded and that no error occurred, and writes the outcome into ``<body data-figures-ok
data-errors>`` so a headless browser can verify the page (see ``tests/test_report.py``).

All text taken from results files is escaped. Both files are written atomically.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ewc import __version__
from ewc.metrics import summarize
from ewc.plots import (
    figure_bytes,
    plot_accuracy_curves,
    plot_accuracy_matrix,
    plot_final_accuracy,
    plot_frontier,
    plot_importance,
    plot_lambda_tradeoff,
    plot_training_loss,
    sweep_frontier_points,
)
from ewc.results import (
    RESULTS_SCHEMA,
    SWEEP_SCHEMA,
    atomic_write_text,
    check_comparable,
    load_results,
    stand_in,
)
from ewc.tables import (
    Results,
    Table,
    final_accuracy_table,
    format_percent,
    group_by_strategy,
    markdown_table,
    md,
    metrics_table,
    sample_cap,
    shared_settings,
    strategy_settings_table,
    takeaway,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Source = str | os.PathLike[str] | Mapping[str, Any]

DEFAULT_TITLE = "Continual learning report"
TIMINGS = {
    "train_s": "train (s)",
    "fisher_s": "Fisher (s)",
    "eval_s": "eval (s)",
    "total_s": "total (s)",
}
METRIC_DEFINITIONS = (
    "In plain words: ACC is the accuracy averaged over all tasks after the last one. "
    "BWT (backward transfer) is how the earlier tasks' accuracy changed from right after "
    "learning each to the end: negative means forgetting. FWT (forward transfer) is how well "
    "each new task is done before training on it, against a randomly initialised model: "
    "positive means the earlier tasks helped, negative that they left the model worse than "
    "random on it. Forgetting is the mean drop from each task's best accuracy to its final one."
)
FIGURE_DPI = 120
CSS_PX_PER_INCH = 96

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 72rem; padding: 0 1rem; color: #1a1a1a; line-height: 1.45; }
h1, h2 { line-height: 1.2; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1rem 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #444; font-size: 0.95rem; }
.figures { display: flex; flex-wrap: wrap; gap: 0 2rem; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; }
.note { color: #444; font-size: 0.95rem; }
.lead { font-size: 1.1rem; }
"""

_CHECK_SCRIPT = """
(() => {
  const errors = [];
  const show = () => {
    if (document.body) document.body.dataset.errors = JSON.stringify(errors);
  };
  const record = (message) => { errors.push(String(message)); show(); };
  addEventListener("error", (e) => record(e.message || "failed to load a " + e.target.tagName),
                   true);
  document.addEventListener("securitypolicyviolation",
                            (e) => record("blocked by the content policy: " + e.blockedURI));
  addEventListener("load", () => {
    const images = Array.from(document.images);
    const ok = images.filter((img) => img.complete && img.naturalWidth > 0).length;
    document.body.dataset.figuresOk = ok + "/" + images.length;
    show();
  });
})();
"""


def write_report(
    results: Sequence[Source],
    out_html: str | os.PathLike[str],
    sweep: Source | None = None,
    title: str = DEFAULT_TITLE,
) -> tuple[Path, Path]:
    """Write ``out_html`` and its Markdown summary (same stem, ``.md``); return both paths.

    ``results`` are results files or dicts (schema ``ewc.results/1``), typically one per strategy
    and seed of one benchmark; ``sweep`` an optional ``ewc.sweep/1`` file or dict.
    """
    runs = [_load(r, RESULTS_SCHEMA) for r in results]
    if not runs:
        raise ValueError("write_report needs at least one results file")
    check_comparable(runs)
    sweep_data = None if sweep is None else _load(sweep, SWEEP_SCHEMA)
    out = Path(out_html)
    html_path = atomic_write_text(out, render_html(runs, sweep_data, title))
    md_path = atomic_write_text(out.with_suffix(".md"), render_markdown(runs, sweep_data, title))
    return html_path, md_path


def _load(source: Source, schema: str) -> Mapping[str, Any]:
    data = source if isinstance(source, Mapping) else load_results(source)
    if data.get("schema") != schema:
        raise ValueError(f"expected a {schema!r} document, got schema {data.get('schema')!r}")
    return data


# --------------------------------------------------------------------------- tables


def sweep_table(sweep: Mapping[str, Any]) -> Table:
    """Header and rows: each swept value's validation accuracies in %, the chosen one marked."""
    header = [str(sweep.get("param")), "old tasks (%)", "new task (%)", "average (%)", "chosen"]
    rows = [
        [
            f"{p['value']:g}",
            *(format_percent(p.get(k)) for k in ("val_old_acc", "val_new_acc", "val_acc")),
            "✓" if p["value"] == sweep.get("chosen") else "",
        ]
        for p in sorted(sweep["points"], key=lambda p: p["value"])
    ]
    return header, rows


def runs_table(runs: Sequence[Results]) -> Table:
    """Header and rows: per run, its seed, creation time, timings, library versions and
    hardware (device, threads or TF32)."""
    header = ["Strategy", "Seed", "Created", *TIMINGS.values(), "Versions", "Hardware"]
    rows = [
        [
            str(r["strategy"]),
            str(r.get("seed", "")),
            str(r.get("created", "")),
            *(_seconds(r.get("timings", {}).get(k)) for k in TIMINGS),
            _pairs(r.get("versions", {})),
            _pairs(r.get("hardware", {})),
        ]
        for r in runs
    ]
    return header, rows


def _pairs(mapping: Mapping[str, Any]) -> str:
    """``{"torch": "2.13"}`` -> ``"torch 2.13"``, comma-separated."""
    return ", ".join(f"{k} {v}" for k, v in mapping.items())


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def metrics_note(runs: Sequence[Results]) -> str:
    """What the metrics table's cells are, in words that match the number of seeds, and what
    each metric means."""
    counts = {row["n"] for row in summarize(runs)}
    if counts == {1}:
        spread = "One run per strategy (one seed), in %: single values, no spread over seeds."
    elif len(counts) == 1:
        spread = f"Mean ± sample standard deviation over {counts.pop()} seeds, in %."
    else:
        spread = (
            "Mean ± sample standard deviation over each strategy's seeds (Runs), in %; a "
            "strategy with one run shows its single value."
        )
    return f"{METRIC_DEFINITIONS} {spread}"


def _seeds_words(group: Sequence[Results]) -> str:
    """``"seed 0"`` for one run, ``"mean of 3 seeds"`` for several."""
    return f"seed {group[0].get('seed', 0)}" if len(group) == 1 else f"mean of {len(group)} seeds"


def _stand_ins(runs: Sequence[Results]) -> list[str]:
    """One sentence per distinct stand-in among ``runs``: what ran instead of what, and why."""
    notes = {(r["benchmark"], note["for"], note["reason"]) for r in runs if (note := stand_in(r))}
    return [
        f"STAND-IN: these runs used {benchmark} instead of {replaced}, because {reason}."
        for benchmark, replaced, reason in sorted(notes)
    ]


def _title(runs: Sequence[Results], title: str) -> str:
    """``title``, marked when the runs are a stand-in for another benchmark or trained on part of
    each task's data (the demo's ``--fast``)."""
    replaced = sorted({note["for"] for r in runs if (note := stand_in(r))})
    cap = sample_cap(runs)
    marks = [
        *([f"stand-in for {', '.join(replaced)}"] if replaced else []),
        *([f"{cap:,} training samples a task"] if cap else []),
    ]
    return " — ".join([title, *marks])


def _lead(runs: Sequence[Results], sweep: Mapping[str, Any] | None) -> str:
    """The result, first thing in the report: the sweep's choice, and in one sentence what the
    runs show (:func:`ewc.tables.takeaway`)."""
    result = takeaway(runs)
    return result if sweep is None else f"{_sweep_line(sweep)} At it, on test data: {result}"


def _intro(runs: Sequence[Results]) -> str:
    """What stands in, what was capped, and which runs the report shows."""
    benchmarks = sorted({f"{r['benchmark']} ({r.get('scenario', '?')}-incremental)" for r in runs})
    strategies = ", ".join(group_by_strategy(runs))
    cap = sample_cap(runs)
    capped = (
        [
            f"Each task trained on {cap:,} of its training samples (max_train_samples; the "
            "demo's --fast), not all: a quick variant, not comparable with the full protocol's "
            "numbers."
        ]
        if cap
        else []
    )
    return " ".join(
        [
            *_stand_ins(runs),
            *capped,
            f"Benchmark {', '.join(benchmarks)}: {len(runs)} run{'' if len(runs) == 1 else 's'} "
            f"of {strategies}.",
            f"Generated by ewc {__version__}.",
        ]
    )


def _sweep_line(sweep: Mapping[str, Any]) -> str:
    param, strategy, chosen = (sweep.get(k) for k in ("param", "strategy", "chosen"))
    points = len(sweep["points"])
    return (
        f"Sweep over {param} for {strategy}: chosen {chosen}, the highest validation accuracy "
        f"of {points} value{'' if points == 1 else 's'} (table below)."
    )


# --------------------------------------------------------------------------- markdown


def render_markdown(
    runs: Sequence[Results], sweep: Mapping[str, Any] | None = None, title: str = DEFAULT_TITLE
) -> str:
    """The Markdown summary: the result in words, the sweep's table (if any), final accuracies,
    metrics and each strategy's settings."""
    parts = [f"# {md(_title(runs, title))}", f"**{md(_lead(runs, sweep))}**", md(_intro(runs))]
    if sweep is not None:
        parts += ["## Sweep", markdown_table(sweep_table(sweep))]
    parts += [
        "## Final accuracy per task",
        markdown_table(final_accuracy_table(runs)),
        "## Metrics",
        md(metrics_note(runs)),
        markdown_table(metrics_table(runs)),
        "## Settings",
        markdown_table(strategy_settings_table(runs)),
        md(f"Shared by every run: {shared_settings(runs)}."),
    ]
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- html


def render_html(
    runs: Sequence[Results], sweep: Mapping[str, Any] | None = None, title: str = DEFAULT_TITLE
) -> str:
    """The whole self-contained HTML page."""
    csp = (
        "default-src 'none'; img-src data:; base-uri 'none'; form-action 'none'; "
        f"style-src '{_sha256(_STYLE)}'; script-src '{_sha256(_CHECK_SCRIPT)}'"
    )
    body = "\n".join(f"<h2>{_e(h)}</h2>\n{content}" for h, content in _sections(runs, sweep))
    title = _title(runs, title)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_STYLE}</style>
<script>{_CHECK_SCRIPT}</script>
</head>
<body>
<h1>{_e(title)}</h1>
<p class="lead"><strong>{_e(_lead(runs, sweep))}</strong></p>
<p>{_e(_intro(runs))}</p>
{body}
</body>
</html>
"""


def _sections(runs: Sequence[Results], sweep: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(heading, HTML) for each part of the report that the data supports."""
    groups = group_by_strategy(runs)
    with_curves = [r for r in runs if r.get("curves")]
    sections = []
    if sweep is not None:
        sweep_html = _figure(plot_lambda_tradeoff(sweep), _sweep_line(sweep)) + _figure(
            plot_frontier(sweep_frontier_points(sweep), data="validation"),
            "The same grid as a frontier: earlier tasks kept against the last task learned, "
            "one point per λ (validation, one seed). Read λ off where the trade-off suits you.",
        )
        sections.append(("Sweep", _html_table(sweep_table(sweep)) + sweep_html))
    sections += [
        (
            "Final accuracy per task",
            _html_table(final_accuracy_table(runs))
            + _figure(plot_final_accuracy(runs), "Accuracy on each task after the last one."),
        ),
        (
            "Metrics",
            f'<p class="note">{_e(metrics_note(runs))}</p>' + _html_table(metrics_table(runs)),
        ),
        (
            "Settings",
            _html_table(strategy_settings_table(runs))
            + f'<p class="note">Shared by every run: {_e(shared_settings(runs))}.</p>',
        ),
    ]
    if with_curves:
        caption = "Test accuracy on every task during training (lowest seed of each strategy)."
        figures = _figure(plot_accuracy_curves(with_curves), caption)
        if all("loss" in r["curves"] for r in with_curves):
            caption = (
                "Training loss, same runs: the task's cross-entropy (solid) and the "
                "regularizer's penalty (dashed), whose sum is minimised."
            )
            figures += _figure(plot_training_loss(with_curves), caption)
        sections.append(("Accuracy and loss during training", figures))
    matrices = (
        _figure(plot_accuracy_matrix(group), f"{name}: R[i][j], {_seeds_words(group)}.")
        for name, group in groups.items()
    )
    sections.append(("Accuracy matrices", _side_by_side(matrices)))
    importance = [
        _figure(plot_importance(group[0]), f"{name}: importance, seed {group[0].get('seed', 0)}.")
        for name, group in groups.items()
        if group[0].get("importance")
    ]
    if importance:
        sections.append(("Where the importance lies", "\n".join(importance)))
    sections += [
        ("Runs, timings and versions", _html_table(runs_table(runs))),
        ("Configuration", "\n".join(map(_config_html, runs))),
    ]
    return sections


def _figure(fig: Figure, caption: str) -> str:
    """``fig`` as an embedded PNG with a caption."""
    data = base64.b64encode(figure_bytes(fig, "png", FIGURE_DPI)).decode("ascii")
    width = round(fig.get_figwidth() * CSS_PX_PER_INCH)
    return (
        f'<figure><img src="data:image/png;base64,{data}" width="{width}" alt="{_e(caption)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _side_by_side(figures: Iterable[str]) -> str:
    return '<div class="figures">' + "\n".join(figures) + "</div>"


def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _config_html(run: Results) -> str:
    """The run's settings that apply to it (``settings``), else its whole config (older files)."""
    settings = run.get("settings", run.get("config", {}))
    config = json.dumps(settings, indent=2, sort_keys=True, default=str)
    label = f"{run['strategy']}, seed {run.get('seed', '')}"
    return f"<details><summary>{_e(label)}</summary><pre>{_e(config)}</pre></details>"


def _sha256(text: str) -> str:
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
    return f"sha256-{digest}"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)
