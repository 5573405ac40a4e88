"""docker-compose.yml speaks the services' configuration contract: every SEGTRAIN_* variable it
sets is one a settings class reads, every address it gives parses as one (clients/addresses.py),
and it runs two replicas of the pipeline and metrics services, each with a published port."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from clients import addresses
from services.common import settings

COMPOSE = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
READ = {f"{cls.model_config.get('env_prefix', '')}{name}".upper()
        for cls in (settings.StorageSettings, settings.ServerSettings, settings.ServingSettings,
                    settings.SecuritySettings, settings.PipelineSettings, settings.MetricsSettings,
                    settings.TrainerSettings)
        for name in cls.model_fields}


def _value(text: str) -> str:
    """A compose value with its ${VAR:-default} / ${VAR:?message} substitutions made."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::-([^}]*)|:\?[^}]*)?\}", lambda m: m.group(1) or "x", str(text))


def test_every_variable_compose_sets_is_read_by_a_service() -> None:
    for name, service in COMPOSE["services"].items():
        for variable in service.get("environment", {}):
            if variable.startswith("SEGTRAIN_"):
                assert variable in READ, f"{name} sets {variable}, which no service reads"


def test_every_address_compose_gives_parses() -> None:
    for service in COMPOSE["services"].values():
        for variable, value in service.get("environment", {}).items():
            if variable.endswith("_ADDRESS"):
                assert addresses.parse(_value(value)).hosts, variable


def test_two_replicas_of_each_control_plane_service_with_a_port_each() -> None:
    for name in ("pipeline", "metrics"):
        service = COMPOSE["services"][name]
        assert service["deploy"]["replicas"] == 2
        (published,) = service["ports"]
        low, high = (int(p) for p in published.split(":")[0].split("-"))
        assert high - low + 1 == 2, f"{name}: one published port per replica"
    pipeline = COMPOSE["services"]["pipeline"]["environment"]
    assert pipeline["SEGTRAIN_PIPELINE_METRICS_ADDRESS"] == "dns:///metrics:50052"
    assert _value(pipeline["SEGTRAIN_PIPELINE_METRICS_PUBLIC_ADDRESS"]).count(",") == 1
    assert float(COMPOSE["services"]["metrics"]["environment"]["SEGTRAIN_METRICS_POLL_INTERVAL_S"]) > 0
    for node in ("trainer-1", "trainer-2"):
        assert COMPOSE["services"][node]["environment"]["SEGTRAIN_TRAINER_PIPELINE_ADDRESS"] == "dns:///pipeline:50051"


def test_every_service_serves_metrics_where_the_scrape_configuration_looks() -> None:
    scrape = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "prometheus.yml").read_text())
    looked_at: set[tuple[str, int]] = set()
    for job in scrape["scrape_configs"]:
        for dns in job.get("dns_sd_configs", []):
            looked_at |= {(name, dns["port"]) for name in dns["names"]}
        for static in job.get("static_configs", []):
            looked_at |= {(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in static["targets"]}
    for name in ("pipeline", "metrics", "trainer-1", "trainer-2"):
        listen = COMPOSE["services"][name]["environment"]["SEGTRAIN_PROMETHEUS_LISTEN"]
        assert (name, int(listen.rsplit(":", 1)[1])) in looked_at, name
    assert COMPOSE["services"]["prometheus"]["profiles"] == ["observability"]
