"""Runs the metrics service: `python -m services.metrics_svc`."""

from __future__ import annotations

import logging

from services.common.server import configure_logging, serve_until_signalled
from services.common.settings import MetricsSettings, SecuritySettings, ServerSettings
from services.metrics_svc.app import build


def main() -> None:
    common = ServerSettings()
    configure_logging(common.log_level)
    settings = MetricsSettings()
    server, port, health_servicer, _ = build(settings, SecuritySettings())
    logging.getLogger("segtrain.metrics").info("metrics service listening on port %d", port)
    server.start()
    print(f"READY metrics {port}", flush=True)
    serve_until_signalled(server, health_servicer, common.shutdown_grace_s)


if __name__ == "__main__":
    main()
