"""The README's copy of the training-parameter contract is the contract itself."""

from __future__ import annotations

from pathlib import Path

from segcore import hyperparameters

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_tables_the_contract_exactly() -> None:
    assert hyperparameters.markdown_table() in README.read_text()
