"""Shared fixtures: an isolated data root for every test, the tiny digits preset (helpers.py holds the rest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from datadiet_nb import presets


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty data root: nothing is read from or written to ~/.cache."""
    root = tmp_path / "data_root"
    monkeypatch.setenv("DATADIET_DATA", str(root))
    return root


@pytest.fixture
def tiny_digits() -> presets.Preset:
    """The digits preset cut down to seconds: 2 epochs, one scoring run at epoch 1, two sparsities."""
    return presets.with_overrides(presets.get("digits"), [
        "recipe.epochs=2", "scoring.num_runs=1", "scoring.epoch=1", "sparsities=0,0.5", "seeds=0"])

