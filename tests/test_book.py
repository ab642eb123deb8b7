"""The main job end to end on a tiny digits sweep: notebooks run by papermill, the Jupyter Book built,
every figure and glued number in the HTML, a browser that loads the images, and a rerun that trains nothing."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datadiet_nb import report
from datadiet_nb.results import load_results
from helpers import DIVERGE_IN_EVERY_PROCESS

REPO = Path(__file__).resolve().parents[1]
# two seeds: the book shows intervals and the paired test's p-values
TINY = ["--set", "recipe.epochs=2", "--set", "scoring.num_runs=2", "--set", "scoring.epoch=1",
        "--set", "sparsities=0,0.5", "--set", "seeds=0,1"]
FIGURES = ["accuracy", "class_accuracy_el2n", "class_std", "class_std_corrected", "keep_ratio",
           "keep_ratio_by_epoch", "agreement"]


SWEEP = [sys.executable, "-m", "datadiet_nb.cli", "sweep", "--preset", "digits", "--store", "runs", "--quiet", *TINY]
# the bias chapter, as `make report` makes it: every rule, inline, then its chapter and the reproducibility appendix
BIAS_SWEEP = [sys.executable, "-m", "datadiet_nb.cli", "sweep", "--preset", "digits-bias", "--store", "runs", "--quiet",
              *TINY, "--set", "scoring.epochs.forgetting=2", "--executor", "inline",
              "--chapters", "bias,reproducibility,findings"]
BIAS_FIGURES = ["bias_measures", "keep_vs_error"]
# the regime chapter, as `make report` makes it (before the bias sweep, whose appendix then covers its runs)
REGIME_OVERRIDES = [a for a in TINY if a != "--set"] + ["train_sizes=12,40"]
REGIME_SWEEP = [sys.executable, "-m", "datadiet_nb.cli", "sweep", "--preset", "digits-regime", "--store", "runs",
                "--quiet", *TINY, "--set", "train_sizes=12,40", "--executor", "inline", "--chapters", "regime"]
ONE_SEED_SWEEP = [*SWEEP, "--set", "seeds=0"]  # the concurrency test needs jobs, not intervals


def sweep(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(SWEEP, cwd=root, capture_output=True, text=True, timeout=900)


def sweep_killed_midway(root: Path) -> None:
    """Start the notebook sweep and SIGKILL it as soon as its first training run is stored (its training notebooks
    started, one finished); fail unless the kill landed mid-work (the sweep still running, fewer records than the
    plan's 8 runs). Waiting a fixed time instead let an idle machine finish all 8 first."""
    process = subprocess.Popen(SWEEP, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    records = root / "runs" / "runs"
    deadline = time.monotonic() + 600
    try:
        while not any(records.glob("*.json")):
            assert process.poll() is None, f"the sweep ended before its first training run: {process.stderr.read()}"
            assert time.monotonic() < deadline, "no training run stored within 600 s"
            time.sleep(0.05)
        assert process.poll() is None, "the sweep had finished: the kill would not have landed mid-work"
        process.kill()
        assert process.wait(timeout=60) == -9
    finally:
        if process.poll() is None:
            process.kill()
    assert len(list((root / "runs" / "runs").glob("*.json"))) < 8, "the kill landed after the work was done"


def fingerprint(paths) -> dict:
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths}


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    """A copy of the book sources in a temporary folder, swept and built there."""
    root = tmp_path_factory.mktemp("report")
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "book", root / "book", ignore=shutil.ignore_patterns("runs", "_build"))
    sweep_killed_midway(root)  # the sweep below must resume it: the tests check the book is whole
    result = sweep(root)
    assert result.returncode == 0, result.stderr[-3000:]
    regime = subprocess.run(REGIME_SWEEP, cwd=root, capture_output=True, text=True, timeout=900)
    assert regime.returncode == 0, regime.stderr[-3000:]
    bias = subprocess.run(BIAS_SWEEP, cwd=root, capture_output=True, text=True, timeout=900)
    assert bias.returncode == 0, bias.stderr[-3000:]
    build = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", ".", "--warningiserror",
                            "--keep-going"], cwd=root, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
    return root


def results_of_preset(store: Path, name: str, overrides: list[str]):
    """The results of one preset's runs in a store that two presets share (some runs, e.g. dense, are common)."""
    from datadiet_nb import presets
    from datadiet_nb.experiment import load_dataset
    from datadiet_nb.sweep import jobs

    study = presets.with_overrides(presets.get(name), overrides)
    return load_results(store, keys=[job.key for job in jobs(study, load_dataset(study)) if job.kind == "run"])


def text_of(page: Path) -> str:
    content = re.sub(r"<[^>]+>", " ", page.read_text())
    return re.sub(r"\s+", " ", html.unescape(content))


def test_the_sweep_wrote_every_notebook_without_errors(book):
    runs = book / "book" / "runs"
    executed = sorted(runs.rglob("*.ipynb"))
    names = {p.relative_to(runs).as_posix() for p in executed}
    runs_expected = {f"digits/train/{run}-seed{seed}.ipynb" for seed in (0, 1)
                     for run in ("dense-s0", "el2n-s0.5", "grand-s0.5", "random-s0.5")}
    assert {"digits/scores.ipynb", "digits/analysis.ipynb", "digits-bias/bias.ipynb", "digits-regime/regime.ipynb",
            "reproducibility.ipynb", "findings.ipynb",
            *runs_expected} == names
    for path in executed:
        for cell in json.loads(path.read_text())["cells"]:
            for output in cell.get("outputs", []):
                assert output["output_type"] != "error", path
                assert not (output["output_type"] == "stream" and output["name"] == "stderr"), (path, output)


def test_results_page_has_every_figure_table_and_glued_number(book):
    page = book / "_build" / "html" / "book" / "runs" / "digits" / "analysis.html"
    source = page.read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', source)
    assert len(images) >= len(FIGURES)
    for src in images:
        assert (page.parent / src).resolve().is_file(), src
    for name in FIGURES:
        for suffix in (".png", ".svg"):
            assert (book / "book" / "runs" / "digits" / "figures" / f"{name}{suffix}").stat().st_size > 1000
    text = text_of(page)
    drawn = (book / "book" / "runs" / "digits" / "figures" / "best_worst.svg").is_file()
    assert drawn != ("The best and worst classes are not drawn" in text)  # the figure, or why not
    # every quoted number, recomputed here from the stored records (of this preset's runs), is on the page
    results = results_of_preset(book / "runs", "digits", [a for a in TINY if a != "--set"])
    for key, value in report.headline_numbers(results).items():
        if key in ("dense_accuracy", "dense_class_std", "dense_class_std_corrected", "dense_worst_class",
                   "el2n_accuracy_50", "el2n_class_std_50", "el2n_top_keep_classes", "el2n_std_p_50",
                   "el2n_std_verdict_50", "random_std_p_50"):
            assert str(value) in text, key
    assert "(95 % CI" in text and ("p = " in text or "p < 0.001" in text), "intervals and a computed p-value"
    assert "worst class" in text and "class std (corrected)" in text and "p (std < dense, Holm)" in text  # the table
    assert "How stable are the scores?" in text and "EL2N@1: run vs run" in text
    assert "Test accuracy against data sparsity" in text


def test_the_bias_chapter_shows_every_rule_and_states_only_what_its_tests_support(book):
    from datadiet_nb import presets
    from datadiet_nb.results import paired_differences, summarize

    page = book / "_build" / "html" / "book" / "runs" / "digits-bias" / "bias.html"
    for name in BIAS_FIGURES:
        assert (book / "book" / "runs" / "digits-bias" / "figures" / f"{name}.png").stat().st_size > 1000
    images = re.findall(r'<img[^>]+src="([^"]+)"', page.read_text())
    assert len(images) >= len(BIAS_FIGURES) and all((page.parent / src).resolve().is_file() for src in images)
    text = text_of(page)
    study = presets.with_overrides(presets.get("digits-bias"), [a for a in TINY if a != "--set"] +
                                   ["scoring.epochs.forgetting=2"])
    results = results_of_preset(book / "runs", "digits-bias", [a for a in TINY if a != "--set"] +
                                ["scoring.epochs.forgetting=2"])
    assert set(results["score"]) == {"dense", *study.scores}  # every rule ran
    labels = report.score_labels(study)
    numbers = report.bias_numbers(summarize(results), paired_differences(results, report.bias_pairs(
        list(study.scores))), labels)
    for key in ("which_std", "which_verdict", "el2n_vs_random_std", "drop_vs_random_worst", "drop_verdict",
                "el2n_keep_error_rho", "poster_claim"):
        assert str(numbers[key]) in text, key  # recomputed here from the records, quoted on the page
    for rule in study.scores:
        assert labels[rule] in text, rule  # in the tables
    from datadiet_nb.results import area_differences, summarize_areas
    areas = report.area_table(summarize_areas(results), area_differences(results, [(r, "random") for r in study.scores]),
                              labels)
    assert "One number across sparsities" in text
    for cell in areas.loc[labels["el2n"]].drop("seeds"):
        assert str(cell) in text, cell  # the areas and their tests, recomputed from the records


def test_the_regime_chapter_quotes_the_crossing_and_the_tests_recomputed_from_the_records(book):
    from datadiet_nb import presets, regime

    page = book / "_build" / "html" / "book" / "runs" / "digits-regime" / "regime.html"
    assert (book / "book" / "runs" / "digits-regime" / "figures" / "regime.png").stat().st_size > 1000
    images = re.findall(r'<img[^>]+src="([^"]+)"', page.read_text())
    assert images and all((page.parent / src).resolve().is_file() for src in images)
    text = text_of(page)
    study = presets.with_overrides(presets.get("digits-regime"), REGIME_OVERRIDES)
    results = results_of_preset(book / "runs", "digits-regime", REGIME_OVERRIDES)
    assert sorted(results["train_size"].unique()) == [12, 40] and set(results["score"]) == {"dense", *study.scores}
    labels = report.score_labels(study)
    numbers = regime.regime_numbers(results, labels)
    numbers["regime_where"] = regime.where_text(study, numbers)
    for key in ("regime_crossing", "regime_small_accuracy", "regime_small_verdict", "regime_large_accuracy",
                "regime_large_verdict", "regime_small_std", "regime_large_worst", "regime_large_el2n_keeps",
                "regime_where"):
        assert str(numbers[key]) in text, key  # recomputed here from the records, quoted on the page
    assert "Which examples to keep depends on how many you have" in text and "40 per class" in text  # the tables
    for rule in study.scores:
        assert labels[rule] in text, rule


def test_book_has_method_appendix_and_reproducibility(book):
    html_dir = book / "_build" / "html"
    assert "GraNd" in text_of(html_dir / "book" / "method.html")
    repro = text_of(html_dir / "book" / "runs" / "reproducibility.html")
    assert "torch" in repro and "scoring" in repro and "training" in repro
    assert (html_dir / "book" / "runs" / "digits" / "train" / "el2n-s0.5-seed0.html").is_file()


def test_the_findings_page_tests_each_claim_on_each_preset_from_the_records(book):
    from datadiet_nb import findings

    page = book / "_build" / "html" / "book" / "runs" / "findings.html"
    text = text_of(page)
    from datadiet_nb.store import Store

    store = Store(book / "runs")  # recomputed here from the records of the store
    table = findings.findings_table(findings.study_results(store, findings.studies_in(store)))
    assert set(table["preset"]) == {"digits", "digits-bias", "digits-regime (40 per class, the largest size)"}
    for _, row in table.iterrows():
        for column in ("claim", "result", "verdict"):
            assert html.escape(row[column], quote=False) in page.read_text() or row[column] in text, row[column]
    assert "small data and models, not the paper" in text and "CIFAR-10 / ResNet-18" in text  # the scale, said
    assert "no dense runs" not in text  # the bias study's dense runs, trained by the digits sweep, are its own too
    toc = text_of(book / "_build" / "html" / "book" / "intro.html")
    assert toc.index("Findings") < toc.index("Method")  # first in the book, after the introduction


def test_rerunning_the_sweep_trains_nothing(book):
    watched = sorted((book / "runs").rglob("*")) + sorted((book / "book" / "runs" / "digits" / "train").glob("*"))
    watched += [book / "book" / "runs" / "digits" / "scores.ipynb"]
    before = fingerprint(p for p in watched if p.is_file())
    result = sweep(book)
    assert result.returncode == 0, result.stderr[-3000:]
    assert fingerprint(p for p in watched if p.is_file()) == before


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium and chromium-driver (see .ci/run)")
        pytest.skip("chromium / chromedriver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--window-size=1280,2000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_browser_renders_the_index_and_loads_the_figures(book, tmp_path):
    browser = _browser()
    try:
        html_dir = book / "_build" / "html"
        browser.get((html_dir / "index.html").as_uri())
        assert "data diet" in browser.title.lower()
        browser.save_screenshot(str(tmp_path / "index.png"))
        browser.get((html_dir / "book" / "runs" / "digits" / "analysis.html").as_uri())
        widths = browser.execute_script(
            "return Array.from(document.querySelectorAll('main img')).map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) >= len(FIGURES) and all(w > 0 for w in widths), widths
        browser.save_screenshot(str(tmp_path / "results.png"))
        assert (tmp_path / "results.png").stat().st_size > 10_000
    finally:
        browser.quit()


def test_two_notebook_sweeps_on_one_store_run_each_job_once(tmp_path):
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, tmp_path / name)
    processes = [subprocess.Popen(ONE_SEED_SWEEP, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    errors = [p.communicate(timeout=900)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [e[-2000:] for e in errors]
    events = [line.split() for line in (tmp_path / "runs" / "events.log").read_text().splitlines()]
    started = [e[4] for e in events if e[3] == "start"]
    # 2 scoring runs, their average, 4 runs, the validation ranking: each by one process
    assert len(started) == len(set(started)) == 8
    assert len(list((tmp_path / "book" / "runs" / "digits" / "train").glob("*.ipynb"))) == 4
    assert len(load_results(tmp_path / "runs")) == 4 * 10


def test_a_diverging_run_under_papermill_is_recorded_failed_and_the_book_lists_it(tmp_path):
    """The default executor's failure path: the run fails in its notebook's kernel, the others finish, the sweep
    exits 1 naming it, the store records it as failed, and the executed results chapter says it is missing."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(DIVERGE_IN_EVERY_PROCESS.format(score="grand"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(ONE_SEED_SWEEP, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    failed = [line.strip() for line in result.stderr.splitlines() if line.startswith("  grand-")]
    assert "1 jobs failed" in result.stderr and len(failed) == 1, result.stderr[-3000:]
    assert failed[0].startswith("grand-s0.5-seed0: run grand s=0.5 seed=0 failed: training loss became nan")
    scores = sorted(r["score"] for r in (json.loads(p.read_text()) for p in (tmp_path / "runs" / "runs").glob("*.json")))
    assert scores == ["dense", "el2n", "random"]
    assert len(list((tmp_path / "runs" / "failed").glob("*.json"))) == 1
    executed = (tmp_path / "book" / "runs" / "digits" / "analysis.ipynb").read_text()
    assert "Failed jobs, left out of every figure and table on this page" in executed
    assert "grand-s0.5-seed0" in executed
    status = subprocess.run([sys.executable, "-m", "datadiet_nb.cli", "status", "--preset", "digits", "--store", "runs",
                             *TINY, "--set", "seeds=0"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert status.returncode == 1 and ", 1 failed," in status.stdout
