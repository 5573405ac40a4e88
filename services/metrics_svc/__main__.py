"""Runs the metrics service: `python -m services.metrics_svc`."""

from __future__ import annotations

import logging

from services.common import observability
from services.common.server import configure_logging, serve_until_signalled
from services.common.settings import MetricsSettings, SecuritySettings, ServerSettings
from services.metrics_svc.app import build


def main() -> None:
    common = ServerSettings()
    configure_logging(common)
    settings = MetricsSettings()
    server, port, health_servicer, service = build(settings, SecuritySettings())
    logging.getLogger("segtrain.metrics").info("metrics service listening on port %d", port)
    server.start()
    observability.serve(common.prometheus_listen, "metrics")
    print(f"READY metrics {port}", flush=True)

    def end_watches() -> None:  # watchers resume elsewhere at once, not after the grace period
        server.loop.call_soon_threadsafe(service.close_watches)

    serve_until_signalled(server, health_servicer, common.shutdown_grace_s, on_stop=end_watches)


if __name__ == "__main__":
    main()
