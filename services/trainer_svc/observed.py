"""A trainer node's Prometheus series (names in the README, "Observability")."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.trainer_svc.runs import RunRegistry


class TrainerCollector(Collector):
    def __init__(self, runs: RunRegistry) -> None:
        self._runs = runs

    def collect(self) -> Iterator[Metric]:
        active = self._runs.active()
        yield GaugeMetricFamily("segtrain_trainer_capacity", "Jobs this node runs at once.", value=self._runs.capacity)
        yield GaugeMetricFamily("segtrain_trainer_running_attempts", "Job attempts running on this node.",
                                value=len(active))
        rate = GaugeMetricFamily("segtrain_training_images_per_second", "Training images per second of each job "
                                 "running here (all its ranks), between its last two progress events.", labels=["job"])
        for run in active:
            rate.add_metric([run.job], run.images_per_second)
        yield rate
