"""The house rules of docs/architecture.md, checked: imports point down the layers, no cycles."""

from pathlib import Path

from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_layers_and_no_cycles(monkeypatch):
    """import-linter's contracts in pyproject.toml (layers, acyclic siblings) all hold, function-level
    imports included."""
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == EXIT_STATUS_SUCCESS
