"""The README's copies of the training-parameter contract and of the input limits are the code's own."""

from __future__ import annotations

import re
from pathlib import Path

from segcore import hyperparameters

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_tables_the_contract_exactly() -> None:
    assert hyperparameters.markdown_table() in README.read_text()


def test_readme_configuration_table_lists_every_variable_the_services_read() -> None:
    """services/common/settings.py owns the variables; the README's table shows each of them."""
    from services.common import settings

    read = {f"{cls.model_config.get('env_prefix', '')}{name}".upper()
            for cls in (settings.StorageSettings, settings.ServerSettings, settings.ServingSettings,
                        settings.SecuritySettings,
                        settings.PipelineSettings, settings.MetricsSettings, settings.TrainerSettings)
            for name in cls.model_fields}
    table = README.read_text().split("| Variable | Default | Used by | Meaning |", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"`(SEGTRAIN_[A-Z0-9_]+)`", table))
    assert read - documented == set(), "variables the services read that the README does not list"
    assert documented - read <= {"SEGTRAIN_ADDRESS", "SEGTRAIN_TOKEN", "SEGTRAIN_TLS", "SEGTRAIN_TEST_POSTGRES_URL",
                                 "SEGTRAIN_PROFILE", "SEGTRAIN_CONFIG"}, \
        "the README lists variables nobody reads"


def test_readme_tables_the_input_limits_exactly() -> None:
    from segcore import limits

    assert limits.markdown_table() in README.read_text()
