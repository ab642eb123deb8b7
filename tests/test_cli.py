"""The command line: every command's success path against hand computations, a digits sweep end to end,
one-line errors that change nothing on disk, Ctrl-C."""

import contextlib
import hashlib
import io

import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datadiet_nb import cli, presets
from datadiet_nb.cli import main
from datadiet_nb.experiment import compute_scores, load_dataset
from datadiet_nb.store import Store
from datadiet_nb.sweep import jobs
from datadiet_nb.results import load_results, summarize
from helpers import hand_summary, interruptible, records_in

TINY = ["--set", "recipe.epochs=2", "--set", "scoring.num_runs=1", "--set", "scoring.epoch=1", "--set", "seeds=0"]


def snapshot(*roots: Path) -> dict:
    """Path -> sha256 of every file under the roots: a change anywhere shows."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def printed_tables(out: str) -> tuple[dict, dict]:
    """The sweep's two printed tables: {(label, sparsity): [(value, lo, hi) x 4, worst class, p, seeds]} and
    {(score, sparsity): [keep ratio per class]}."""
    summary, ratios, section, sparsity, score = {}, {}, None, None, None
    for line in out.splitlines():
        if line.lstrip().startswith("accuracy"):
            section = "summary"
        elif line.startswith("class keep ratio"):
            section = "ratios"
        elif section == "summary" and (cells := re.findall(r"(\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\]", line)):
            head, tail = line.split(cells[0][0], 1)[0].split(), line.rsplit("]", 1)[1].split()
            sparsity = float(head[0]) if len(head) == 2 else sparsity
            summary[(head[-1], sparsity)] = [tuple(map(float, c)) for c in cells] + tail
        elif section == "ratios" and re.search(r"\d\.\d{3}$", line):
            words = line.split()
            if not re.fullmatch(r"\d\.\d+", words[0]):  # pandas leaves a repeated score blank
                score = words.pop(0)
            ratios[(score, float(words[0]))] = [float(w) for w in words[1:]]
    return summary, ratios


def test_digits_sweep_prints_the_results_tables(tmp_path, capsys):
    """Two seeds: every printed number is the one computed by hand from the records, to its printed digits."""
    store = tmp_path / "runs"
    args = ["sweep", "--preset", "digits", "--store", str(store), "--quiet", "--executor", "inline", *TINY,
            "--set", "seeds=0,1", "--set", "sparsities=0,0.5,0.9"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for text in ("class std (corrected)", "p (std < dense, Holm)", "class keep ratio"):
        assert text in out
    records = records_in(store)
    assert len(records) == 14
    expected = hand_summary(records)
    tested = summarize(load_results(store)).set_index(["score", "sparsity"])  # its tests: tests/test_stats.py
    summary, ratios = printed_tables(out)
    labels = {"dense": "Dense", "el2n": "EL2N@1", "grand": "GraNd@1", "random": "Random"}
    assert set(summary) == {(labels[s], p) for s, p in expected} and set(ratios) == set(expected)
    for (score, sparsity), hand in expected.items():
        row = summary[(labels[score], sparsity)]
        for (value, lo, hi), name in zip(row, ("overall_accuracy", "class_std", None, "worst_class_accuracy")):
            assert lo <= value <= hi
            if name:
                assert value == pytest.approx(hand[name], abs=5e-4), (score, sparsity, name)
        worst, p, seeds = row[4:]
        assert (worst, int(seeds)) == (hand["worst_class"], 2)
        assert p == "-" if score == "dense" else float(p) == pytest.approx(
            tested.loc[(score, sparsity), "std_below_dense_p_adjusted"], abs=5e-4)
        np.testing.assert_allclose(ratios[(score, sparsity)], hand["keep_ratio"], atol=5e-4)
    # a second sweep finds everything stored and trains nothing
    before = snapshot(store)
    assert main(args) == 0
    assert snapshot(store) == before


def test_prune_writes_kept_indices_and_keep_ratios(tmp_path, capsys):
    out = tmp_path / "kept.npy"
    assert main(["prune", "--store", str(tmp_path / "runs"), "--quiet", *TINY, "--score", "grand",
                 "--sparsity", "0.3", "--out", str(out)]) == 0
    kept = np.load(out)
    assert len(kept) == 628 and np.all(np.diff(kept) > 0)  # round(0.7 * 897) = round(627.9)
    assert "class keep ratio" in capsys.readouterr().out


def tiny_preset(*extra: str) -> presets.Preset:
    """The preset the TINY command-line options describe."""
    return presets.with_overrides(presets.get("digits"), [a for a in TINY if a != "--set"] + list(extra))


def by_hand(scores: np.ndarray, sparsity: float, offset: float) -> np.ndarray:
    """Hardest first (ties: lower index first), skip round(offset N), keep the next round((1 - s) N), ascending."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    skip, keep = int(offset * n + 0.5), int((1 - sparsity) * n + 0.5)
    return np.sort(order[skip:skip + keep])


def test_an_offset_skips_exactly_the_top_fraction_in_prune_train_and_user_scores(tmp_path, capsys):
    store = tmp_path / "runs"
    out = tmp_path / "kept.npy"
    assert main(["prune", "--store", str(store), "--quiet", *TINY, "--score", "el2n", "--sparsity", "0.5",
                 "--offset", "0.1", "--out", str(out)]) == 0
    preset = tiny_preset()
    ds = load_dataset(preset)
    scores = compute_scores(preset, ds, Store(store))["el2n"]
    expected = by_hand(scores, 0.5, 0.1)
    np.testing.assert_array_equal(np.load(out), expected)
    assert not np.array_equal(expected, by_hand(scores, 0.5, 0.0))
    assert main(["train", "--store", str(store), "--quiet", *TINY, "--score", "el2n", "--sparsity", "0.5",
                 "--offset", "0.1"]) == 0
    [record] = records_in(store)
    assert record["offset"] == 0.1 and record["num_kept"] == len(expected)
    np.testing.assert_array_equal(Store(store).load_kept(record["key"]), expected)
    mine = np.random.default_rng(0).normal(size=ds.num_train)  # a researcher's own scores
    np.save(tmp_path / "mine.npy", mine)
    assert main(["prune", "--store", str(store), "--quiet", *TINY, "--scores", str(tmp_path / "mine.npy"),
                 "--sparsity", "0.3", "--offset", "0.2", "--out", str(tmp_path / "mine_kept.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "mine_kept.npy"), by_hand(mine, 0.3, 0.2))


def test_presets_score_train_and_status_print_what_they_computed(tmp_path, capsys):
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(presets.PRESETS)
    assert all(f"x {len(presets.get(line.split()[0]).seeds)} seeds" in line for line in listed)
    store = tmp_path / "runs"
    assert main(["score", "--store", str(store), "--quiet", *TINY]) == 0
    out = capsys.readouterr().out
    preset = tiny_preset()
    ds = load_dataset(preset)
    scores, labels = compute_scores(preset, ds, Store(store)), ds.train_labels.numpy()
    for c, name in enumerate(ds.classes):
        row = f"{name:>16s} {scores['el2n'][labels == c].mean():8.4f} {scores['grand'][labels == c].mean():8.4f}"
        assert row in out.splitlines()
    assert main(["train", "--store", str(store), "--quiet", *TINY, "--score", "grand", "--sparsity", "0.5"]) == 0
    out = capsys.readouterr().out
    [record] = records_in(store)
    assert f"test accuracy {record['overall_accuracy']:.4f}, std of class accuracy {record['bias']['std']:.4f}" in out
    assert main(["status", "--store", str(store), *TINY]) == 0
    out = capsys.readouterr().out
    total = len(jobs(preset, ds))
    # done: the scores, their one scoring run (read back from them) and the run
    assert out.splitlines()[-1] == f"digits in {store}: 3 done, 0 running, 0 failed, {total - 3} missing"
    assert sum(line.startswith("missing") for line in out.splitlines()) == total - 3


def test_ctrl_c_exits_130_with_nothing_half_written_and_the_run_resumes(tmp_path):
    store = tmp_path / "runs"
    command = [sys.executable, "-m", "datadiet_nb.cli", "train", "--store", str(store), "--quiet", *TINY,
               "--set", "recipe.epochs=40", "--set", "checkpoint_epochs=1", "--score", "random", "--sparsity", "0.5"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=interruptible)
    deadline = time.monotonic() + 300
    checkpoints = store / "checkpoints"
    while not (checkpoints.is_dir() and list(checkpoints.glob("*.pt"))):  # interrupt once training is under way
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130 and err.strip().splitlines() == [
        "datadiet-nb: interrupted; run the same command again to resume"]
    assert not list((store / "runs").glob("*.json")) and not list(store.rglob("*.tmp"))
    assert not list((store / "claims").glob("*.claim"))
    [checkpoint] = checkpoints.glob("*.pt")
    torch.load(checkpoint, weights_only=True)  # whole, ready to resume from
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    reference = tmp_path / "reference"
    assert main(["train", "--store", str(reference), "--quiet", *TINY, "--set", "recipe.epochs=40",
                 "--set", "checkpoint_epochs=1", "--score", "random", "--sparsity", "0.5"]) == 0
    assert [r["predictions"] for r in records_in(store)] == [r["predictions"] for r in records_in(reference)]


@pytest.fixture
def populated(tmp_path):
    """A store and an output file that a failing command must leave exactly as they were."""
    store = tmp_path / "runs"
    (store / "runs").mkdir(parents=True)
    (store / "runs" / "0123456789abcdef.json").write_text('{"sentinel": true}\n')
    out = tmp_path / "kept.npy"
    np.save(out, np.arange(5))
    bad_scores = tmp_path / "scores.npy"
    np.save(bad_scores, np.ones(10))
    return tmp_path, store, out, bad_scores


BAD_INPUTS = {
    "unknown preset": (["train", "--preset", "imagenet", "--sparsity", "0.5"], "unknown preset"),
    "unknown dataset": (["train", "--set", "dataset=mnist", "--sparsity", "0.5"], "unknown dataset"),
    "unknown model": (["train", "--set", "model=vgg16", "--sparsity", "0.5"], "unknown model"),
    "unknown score": (["train", "--score", "el2n-sorted", "--sparsity", "0.5"], "invalid choice"),
    "sparsity 1": (["train", "--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    "negative sparsity": (["prune", "--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
    "offset too large": (["prune", "--sparsity", "0.2", "--offset", "0.3"], "exceeds 1"),
    "K < 1": (["score", "--set", "scoring.num_runs=0"], "K must be >= 1"),
    "negative epochs": (["train", "--set", "recipe.epochs=-3", "--sparsity", "0.5"], "epochs must be >= 0"),
    "wrong type": (["score", "--set", "recipe.epochs=many"], "expected int"),
    "unknown key": (["score", "--set", "recipe.epoch=5"], "unknown preset key"),
    "scores length": (["prune", "--sparsity", "0.5", "--scores", "{bad_scores}"], "training examples"),
    "out exists": (["prune", "--sparsity", "0.5", "--out", "{out}"], "exists"),
}


def run_cli(argv: list[str]) -> int:
    """Exit status of the command, whether argparse exits or main returns."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_and_changes_nothing(case, populated, capsys):
    tmp_path, store, out, bad_scores = populated
    argv, expected = BAD_INPUTS[case]
    argv = [a.format(out=out, bad_scores=bad_scores) for a in argv]
    before = snapshot(tmp_path)
    assert run_cli([*argv, "--store", str(store), "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_the_installed_command_reports_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "datadiet_nb.cli", "train", "--preset", "nope",
                             "--sparsity", "0.5", "--store", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("datadiet-nb: error: unknown preset 'nope'; choose one of "
                                     f"{sorted(presets.PRESETS)} or a .toml/.json preset file")
    assert not any(tmp_path.iterdir())


def test_dry_run_lists_the_jobs_and_estimates_without_running_anything(tmp_path, capsys, monkeypatch):
    from datadiet_nb import experiment
    monkeypatch.setattr(experiment, "_train_and_record", lambda *a, **k: pytest.fail("a dry run trained"))
    store = tmp_path / "runs"
    assert main(["sweep", "--dry-run", "--store", str(store), "--quiet", *TINY, "--set", "sparsities=0,0.5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines[:6]] == [
        ["missing", "scoring-run-seed1000"], ["missing", "scores"], ["missing", "dense-s0-seed0"],
        ["missing", "el2n-s0.5-seed0"], ["missing", "grand-s0.5-seed0"], ["missing", "random-s0.5-seed0"]]
    assert lines[-1].startswith("digits: 6 jobs to run, about ") and "ms per training step of 64" in lines[-1]
    assert not store.exists()


def test_the_cli_prints_warnings_on_the_current_stderr_and_leaves_logging_as_it_was(monkeypatch, capsys, caplog):
    logger = logging.getLogger("datadiet_nb")
    before = (list(logger.handlers), logger.propagate, logger.level)
    monkeypatch.setattr(cli, "cmd_presets", lambda args: logger.warning("a warning from the package"))
    earlier_stream = io.StringIO()  # a stream that is closed once its command is over, like a test's capture
    with contextlib.redirect_stderr(earlier_stream):
        assert main(["presets"]) == 0
    assert earlier_stream.getvalue() == "datadiet-nb: a warning from the package\n"
    earlier_stream.close()
    assert (list(logger.handlers), logger.propagate, logger.level) == before
    caplog.clear()
    assert main(["presets"]) == 0
    assert capsys.readouterr().err == "datadiet-nb: a warning from the package\n"
    assert [r.getMessage() for r in caplog.records] == ["a warning from the package"]  # a caller's logging sees it
    assert (list(logger.handlers), logger.propagate, logger.level) == before


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_built_in_preset_is_valid_as_shipped(name):
    """A preset whose own settings contradict each other (e.g. forgetting counted over more epochs than its scoring
    runs train) fails here, not at the start of `make report`."""
    assert presets.get(name).validate() == presets.get(name)
