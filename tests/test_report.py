"""The HTML + Markdown report: content, escaping, self-containment, and a real browser load.

Uses the synthetic results files in tests/data/report/ (see tests/test_plots.py).
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ewc.report import write_report

DATA = Path(__file__).parent / "data" / "report"
RUNS = sorted(DATA.glob("*-seed*.json"))
SWEEP = DATA / "sweep.json"
# final accuracy, curves, one accuracy matrix per strategy, importance (ewc only), sweep (the
# λ trade-off and the frontier)
FIGURES = 1 + 1 + 2 + 1 + 2
TITLE = "EWC vs naive <on> permuted & digits"
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
EXTERNAL = re.compile(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//|url\(|@import""", re.I)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path, str]:
    out = tmp_path_factory.mktemp("report") / "report.html"
    html_path, md_path = write_report(RUNS, out, sweep=SWEEP, title=TITLE)
    return html_path, md_path, html_path.read_text(encoding="utf-8")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _expected_metrics() -> dict[str, list[str]]:
    """Per strategy, each metric's mean ± sample std in % — computed independently."""
    runs = [_load(p) for p in RUNS]
    expected = {}
    for strategy in ("naive", "ewc"):
        values = [[r["metrics"][k] for r in runs if r["strategy"] == strategy] for k in
                  ("acc", "bwt", "fwt", "forgetting")]  # fmt: skip
        expected[strategy] = [
            f"{100 * statistics.mean(v):.2f} ± {100 * statistics.stdev(v):.2f}" for v in values
        ]
    return expected


def test_writes_html_and_markdown_side_by_side(report):
    html_path, md_path, _ = report
    assert md_path == html_path.with_suffix(".md")
    assert sorted(p.name for p in html_path.parent.iterdir()) == ["report.html", "report.md"]


def test_embeds_every_figure_as_png(report):
    page = report[2]
    images = IMG.findall(page)
    assert len(images) == FIGURES == page.count("<img ")
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG")


def test_metrics_table_holds_mean_and_std_in_percent(report):
    _, md_path, page = report
    markdown = md_path.read_text(encoding="utf-8")
    for strategy, cells in _expected_metrics().items():
        row = "".join(f"<td>{html.escape(c)}</td>" for c in [strategy, "2", *cells])
        assert row in page
        assert f"| {strategy} | 2 | {' | '.join(cells)} |" in markdown


def test_config_versions_and_timings_are_reported(report):
    page = report[2]
    run = _load(RUNS[0])
    assert html.escape('"batch_size": 64') in page
    assert html.escape(", ".join(f"{k} {v}" for k, v in run["versions"].items())) in page
    assert "<th>Hardware</th>" in page
    assert f"<td>{run['timings']['total_s']:.1f}</td>" in page
    assert "Sweep over lam for ewc: chosen 100, the highest validation accuracy of" in page


def test_text_from_results_is_escaped(report):
    page = report[2]
    assert "&lt;synthetic &amp; fixture&gt;" in page  # from config["note"]
    assert "<synthetic" not in page
    assert f"<title>{html.escape(TITLE)}</title>" in page


def test_makes_no_external_requests(report):
    page = report[2]
    assert not EXTERNAL.search(page)
    assert "http://" not in page and "https://" not in page
    assert html.escape("default-src 'none'; img-src data:") in page


def test_a_single_run_without_importance_or_sweep(tmp_path):
    html_path, md_path = write_report([_load(RUNS[-1])], tmp_path / "one.html")
    page = html_path.read_text(encoding="utf-8")
    assert len(IMG.findall(page)) == 3  # final accuracy, curves, accuracy matrix
    assert "Where the importance lies" not in page and "Sweep" not in page
    assert "| naive | 1 |" in md_path.read_text(encoding="utf-8")


def test_rejects_documents_of_another_schema(tmp_path):
    with pytest.raises(ValueError, match=r"ewc\.results/1"):
        write_report([SWEEP], tmp_path / "bad.html")
    with pytest.raises(ValueError, match="at least one"):
        write_report([], tmp_path / "empty.html")


# --------------------------------------------------------------------------- browser


def _render_in_chromium(page: Path, profile: Path) -> dict[str, Any]:
    """Load ``page`` headless; return the status the report's own script wrote into <body>."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip(
            "chromium not found: install Debian's chromium package to run the browser check"
        )
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri(),
    ]  # fmt: skip
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, f"no <body> in chromium's DOM dump:\n{dom[:2000]}"
    attributes = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))
    return {
        "figures": attributes.get("figures-ok"),
        "errors": json.loads(html.unescape(attributes.get("errors", '["no status written"]'))),
    }


def test_renders_in_a_browser_without_errors(report, tmp_path):
    status = _render_in_chromium(report[0], tmp_path / "profile")
    assert status == {"figures": f"{FIGURES}/{FIGURES}", "errors": []}


def test_browser_check_catches_broken_figures_and_external_requests(report, tmp_path):
    """The check is not vacuous: a corrupt image and an external one are both reported."""
    page = report[2]
    broken = IMG.sub('<img src="data:image/png;base64,AAAA"', page, count=1)
    broken = broken.replace("<h1>", '<img src="https://example.invalid/x.png"><h1>', 1)
    path = tmp_path / "broken.html"
    path.write_text(broken, encoding="utf-8")
    status = _render_in_chromium(path, tmp_path / "profile")
    assert status["figures"] == f"{FIGURES - 1}/{FIGURES + 1}"
    assert any("example.invalid" in e for e in status["errors"])


# --------------------------------------------------------------------------- first-hour clarity


def test_a_stand_in_is_named_in_the_title_and_intro(tmp_path):
    run = _load(RUNS[-1])
    reason = "the fashion-mnist and mnist files were not found and downloads are off"
    run["config"]["extra"] = {"stand_in": {"for": "fashion-mnist-to-mnist", "reason": reason}}
    html_path, md_path = write_report([run], tmp_path / "r.html")
    page, markdown = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    title = "Continual learning report — stand-in for fashion-mnist-to-mnist"
    assert f"<title>{title}</title>" in page and markdown.startswith(f"# {title}\n")
    sentence = f"STAND-IN: these runs used {run['benchmark']} instead of fashion-mnist-to-mnist"
    assert f"{sentence}, because {reason}." in markdown
    assert html.escape(sentence) in page


def test_no_stand_in_no_mark(report):
    assert "stand-in" not in report[2].lower()


def test_statistics_words_match_the_number_of_seeds(report, tmp_path):
    assert "Mean ± sample standard deviation over 2 seeds, in %." in report[2]
    _, md_path = write_report([_load(RUNS[0])], tmp_path / "one.html")
    markdown = md_path.read_text(encoding="utf-8")
    assert "One run per strategy (one seed), in %: single values" in markdown
    assert "standard deviation" not in markdown


def test_configuration_lists_only_the_settings_that_apply(tmp_path):
    run = _load(RUNS[0])
    run["settings"] = {"model": "cnn", "strategy": run["strategy"]}
    page = write_report([run], tmp_path / "r.html")[0].read_text(encoding="utf-8")
    config = re.search(r"<details><summary>.*?</summary><pre>(.*?)</pre>", page, re.S)
    assert config and json.loads(html.unescape(config.group(1))) == run["settings"]


def test_the_training_loss_is_drawn_beside_the_accuracy_curves(tmp_path):
    runs = [_load(p) for p in RUNS]
    for run in runs:
        run["curves"]["loss"] = [None, *(1.0 for _ in run["curves"]["step"][1:])]
    page = write_report(runs, tmp_path / "r.html")[0].read_text(encoding="utf-8")
    section = page.split("<h2>Accuracy and loss during training</h2>")[1].split("<h2>")[0]
    assert len(IMG.findall(section)) == 2
    assert "Test accuracy on every task during training" in section
    assert "Training loss, same runs: the task&#x27;s cross-entropy (solid)" in section


# --------------------------------------------------------------------------- the result first


def _two_tasks(run: dict[str, Any], kept: float, learned: float) -> dict[str, Any]:
    """``run`` cut to two tasks, Fashion-MNIST then MNIST, with the final accuracies given."""
    run = json.loads(json.dumps(run))
    run["task_names"] = ["fashion-mnist", "mnist"]
    run["accuracy_matrix"] = [[0.8, 0.1], [kept, learned]]
    run["random_init_accuracy"] = [0.1, 0.1]
    run.pop("curves", None)
    run.pop("importance", None)
    return run


def test_the_report_states_its_result_in_one_sentence_first(tmp_path):
    """The takeaway — the strategy, its λ, what it kept against naive fine-tuning and at what
    cost — opens both files, before any table or metric."""
    ewc_run, naive_run = (_load(p) for p in (RUNS[0], RUNS[2]))
    assert (ewc_run["strategy"], naive_run["strategy"]) == ("ewc", "naive")
    ewc_run["config"]["lam"] = 3000.0
    runs = [_two_tasks(ewc_run, 0.69, 0.96), _two_tasks(naive_run, 0.41, 0.97)]
    html_path, md_path = write_report(runs, tmp_path / "r.html")
    sentence = (
        "ewc (λ = 3000) kept fashion-mnist at 69.0 % against 41.0 % without it (naive "
        "fine-tuning), at a cost of 1.0 point on mnist (96.0 % against 97.0 %)."
    )
    markdown = md_path.read_text(encoding="utf-8")
    assert markdown.splitlines()[2] == f"**{sentence}**"  # right under the title
    page = html_path.read_text(encoding="utf-8")
    assert page.index(html.escape(sentence)) < page.index("<table>")
    assert markdown.index("In plain words: ACC is") < markdown.index("| Strategy | Runs | ACC")


def test_each_strategys_lambda_is_shown_outside_the_configuration(report):
    page, markdown = report[2], report[1].read_text(encoding="utf-8")
    assert "| Strategy | λ |" in markdown and "| ewc | 100 |" in markdown
    settings = page.index("<h2>Settings</h2>")
    assert settings < page.index("<h2>Configuration</h2>")
    assert "<td>ewc</td><td>100</td>" in page[settings:]
    assert "Shared by every run: benchmark permuted-digits, scenario domain" in markdown


def test_a_run_on_part_of_the_data_says_so_in_title_and_intro(tmp_path):
    """The demo's --fast (10,000 samples a task) is named, so its numbers are not compared with
    the full protocol's."""
    runs = [_load(p) for p in RUNS]
    for run in runs:
        run["config"]["max_train_samples"] = 10000
    html_path, md_path = write_report(runs, tmp_path / "r.html")
    markdown = md_path.read_text(encoding="utf-8")
    title = "Continual learning report — 10,000 training samples a task"
    assert markdown.startswith(f"# {title}\n")
    assert f"<title>{title}</title>" in html_path.read_text(encoding="utf-8")
    assert "Each task trained on 10,000 of its training samples" in markdown
    assert "not comparable with the full protocol's numbers" in markdown


def test_a_sweep_report_opens_with_its_choice_and_table(report):
    page, markdown = report[2], report[1].read_text(encoding="utf-8")
    lead = markdown.splitlines()[2]
    assert lead.startswith("**Sweep over lam for ewc: chosen 100, the highest validation")
    assert "1 runs" not in markdown and "4 runs of ewc, naive" in markdown
    assert markdown.index("## Sweep") < markdown.index("## Final accuracy per task")
    assert page.index("<h2>Sweep</h2>") < page.index("<h2>Final accuracy per task</h2>")
    sweep = page[page.index("<h2>Sweep</h2>") :]
    assert sweep.index("<table>") < sweep.index("<img")  # the λ table above its figures
