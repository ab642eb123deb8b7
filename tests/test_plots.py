"""The figure functions on a hand-made results table: the right lines, classes and reference."""

import matplotlib
import numpy as np
import pandas as pd

from datadiet_nb import plots, report

matplotlib.use("Agg")
TEST_PER_CLASS = 100


def fake_results(classes=("cat", "dog", "ship"), seeds=(0, 1)) -> pd.DataFrame:
    rows = []
    for seed in seeds:
        for score, sparsity in [("dense", 0.0)] + [(s, p) for s in ("el2n", "grand", "random") for p in (0.5, 0.9)]:
            accs = np.array([0.6, 0.7, 0.95]) - (sparsity / 10 if score != "random" else 0.0)
            accs = accs + 0.01 * seed  # seeds differ a little
            for i, name in enumerate(classes):
                rows.append({"preset": "toy", "dataset": "toy", "model": "m", "score": score, "sparsity": sparsity,
                             "offset": 0.0, "seed": seed, "class": name, "class_index": i,
                             "class_accuracy": accs[i], "keep_ratio": 1.0 if score == "dense" else 1 - sparsity + 0.1 * (i == 0),
                             "overall_accuracy": accs.mean(), "class_std": accs.std(),
                             "key": f"{score}-{sparsity}-{seed}",
                             "correct": np.arange(TEST_PER_CLASS) < round(accs[i] * TEST_PER_CLASS)})
    return pd.DataFrame(rows)


def test_accuracy_figure_has_one_line_per_score_and_a_dense_reference():
    fig = plots.accuracy_vs_sparsity(fake_results())
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["EL2N", "GraNd", "Random", "Dense"]
    dense_line = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"][0]
    assert np.allclose(dense_line.get_ydata(), np.mean([0.6, 0.7, 0.95]) + 0.005)
    assert len(fig.axes[0].collections) == 3, "every score's line has its interval band"


def test_class_figures_name_every_class():
    results = fake_results()
    for fig in (plots.class_accuracy_vs_sparsity(results, "el2n"), plots.keep_ratio_vs_sparsity(results, "grand")):
        assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["cat", "dog", "ship"]
    for fig in (plots.class_accuracy_vs_sparsity(results, "el2n"),):
        assert len(fig.axes[0].collections) == 3, "every class's line has its interval band"


def test_best_and_worst_classes_are_chosen_by_the_ranking_not_by_the_test_set():
    results = fake_results()  # on the test set cat is worst and ship best
    ranking = pd.Series({"cat": 0.9, "dog": 0.5, "ship": 0.1})  # held-out data says otherwise
    fig = plots.best_worst_classes(results, ranking, "el2n", n=10, labels={"el2n": "EL2N@3"})
    best, worst = ([t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes)
    assert best == ["cat"] and worst == ["ship"] and "validation" in fig.axes[0].get_title()
    assert "EL2N@3" in fig._suptitle.get_text()


def test_top_keep_classes_name_the_two_kept_most_or_say_every_class_is_kept_alike():
    ratios = pd.Series({"cat": 0.9, "dog": 0.71, "ship": 0.2})
    assert report.top_keep_classes(ratios) == "cat (0.90) and dog (0.71)"
    assert report.top_keep_classes(pd.Series({"cat": 0.5, "dog": 0.502, "ship": 0.499})) == "every class alike (0.50)"
    assert report.top_keep_classes(pd.Series({"cat": 0.5, "dog": 0.51})) == "dog (0.51) and cat (0.50)"
    assert report.top_keep_classes(pd.Series(dtype=float)) == ""


def test_headline_numbers_come_from_the_table():
    numbers = report.headline_numbers(fake_results())
    assert numbers["dense_accuracy"].startswith(f"{100 * (np.mean([0.6, 0.7, 0.95]) + 0.005):.1f} % (95 % CI ")
    assert numbers["el2n_std_p_50"].startswith("p ") and numbers["random_std_verdict_50"]
    assert numbers["dense_worst_class"].startswith("cat")
    assert numbers["el2n_top_keep_classes"].startswith("cat (0.60)")
    from myst_nb.core.variables import format_plain_text
    shown = format_plain_text(repr(numbers["dense_accuracy"]), "")  # what {glue:text} puts on the page
    assert shown == str(numbers["dense_accuracy"])  # without quotes


def test_save_writes_png_and_svg(tmp_path):
    paths = plots.save(plots.class_std_vs_sparsity(fake_results()), tmp_path / "fig" / "std")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 1000 for p in paths)


def test_failures_note_names_each_failed_job():
    from datadiet_nb.report import failures_note
    assert failures_note({}) is None
    note = failures_note({"grand-s0.5-seed0": "run grand s=0.5 seed=0 failed: training loss became nan\nmore"})
    assert "`grand-s0.5-seed0`: run grand s=0.5 seed=0 failed: training loss became nan" in note.data
    assert "more" not in note.data


def test_the_chapter_names_the_budget_rule_and_each_score_epoch():
    from datadiet_nb import presets
    paper = report.study_numbers(presets.get("cifar10-resnet18"))
    assert "as many optimiser steps" in paper["budget"] and "EL2N@20" in paper["score_epochs"]
    same_epochs = report.study_numbers(presets.with_overrides(presets.get("digits"), ["recipe.budget=epochs",
                                                                                    "scoring.epochs.grand=0"]))
    assert "as many epochs" in same_epochs["budget"] and same_epochs["grand_label"] == "GraNd@0"
    assert report.study_notes(presets.get("digits")) is None
    note = report.study_notes(presets.get("cifar10-cpu")).data
    assert "first 500 training images of each class" in note and "full** training set" in note


def test_a_run_figure_is_drawn_for_every_rule_not_only_the_papers():
    record = {"score": "el2n-easy", "sparsity": 0.5, "seed": 0, "classes": ["a", "b"], "class_accuracy": [0.5, 1.0],
              "keep_ratio": [0.25, 0.75]}
    fig = plots.run_classes(record)
    assert "el2n-easy at sparsity 0.5, seed 0" in fig.axes[0].get_title()
    plots.plt.close(fig)


def test_the_regime_panels_put_training_set_size_on_a_log_axis_with_a_dense_line_per_size():
    rows = [{"train_size": size, "score": score, "sparsity": 0.0 if score == "dense" else 0.5,
             **{f"{name}{end}": value for name in plots.REGIME_MEASURES
                for end, value in (("", base), ("_lo", base - 0.05), ("_hi", base + 0.05))}}
            for size, base in ((10, 0.4), (100, 0.7)) for score in ("dense", "el2n", "el2n-easy")]
    fig = plots.regime_panels(pd.DataFrame(rows), labels={"el2n": "EL2N", "el2n-easy": "EL2N easy"})
    assert len(fig.axes) == 3 and all(ax.get_xscale() == "log" for ax in fig.axes)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"EL2N", "EL2N easy", "Dense"} and lines["Dense"].get_linestyle() == "--"
    assert list(lines["EL2N"].get_xdata()) == [10, 100]
    plots.plt.close(fig)


def test_glued_text_reaches_the_page_as_it_is_even_when_it_reads_as_a_python_literal():
    from myst_nb.core.variables import format_plain_text

    for text in ("1,000", "100", "[cat]", "cat (0.93) and dog (0.72)", "-13.8 points (95 % CI -20.4 to -7.2)", "'q'"):
        assert format_plain_text(repr(report.GlueText(text)), "") == text
