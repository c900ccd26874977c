"""The house rules of docs/architecture.md, checked: imports point down the layers, no cycles."""

from pathlib import Path

from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_layers_and_no_cycles(monkeypatch):
    """import-linter's contracts in pyproject.toml (layers, acyclic siblings) all hold, function-level
    imports included."""
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == EXIT_STATUS_SUCCESS


def test_architecture_doc_lists_every_module():
    """docs/architecture.md's tree names every module of the package, and nothing else."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    block = doc.split("## The tree", 1)[1].split("```", 2)[1]
    listed = {line.split()[0] for line in block.splitlines() if line.strip()}
    package = ROOT / "src" / "codeprune"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    assert listed == modules, (f"missing from docs/architecture.md: {sorted(modules - listed)}; "
                               f"listed but absent: {sorted(listed - modules)}")
