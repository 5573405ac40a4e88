"""Runs the pipeline service: `python -m services.pipeline_svc`."""

from __future__ import annotations

import logging
import os

from services.common import observability
from services.common.server import configure_logging, serve_until_signalled
from services.common.settings import PipelineSettings, SecuritySettings, ServerSettings, StorageSettings
from services.pipeline_svc.app import build


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common = ServerSettings()
    configure_logging(common)
    server, port, health_servicer, service = build(PipelineSettings(), StorageSettings(), SecuritySettings())
    service.start()
    logging.getLogger("segtrain.pipeline").info("pipeline service listening on port %d", port)
    server.start()
    observability.serve(common.prometheus_listen, "pipeline")
    print(f"READY pipeline {port}", flush=True)
    serve_until_signalled(server, health_servicer, common.shutdown_grace_s, on_stop=service.stop)


if __name__ == "__main__":
    main()
