"""Runs a trainer node: `python -m services.trainer_svc`."""

from __future__ import annotations

import logging
import os

from services.common import observability
from services.common.server import configure_logging, serve_until_signalled
from services.common.settings import SecuritySettings, ServerSettings, StorageSettings, TrainerSettings
from services.trainer_svc.app import build
from services.trainer_svc.node import shut_down


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is ever contacted
    common = ServerSettings()
    configure_logging(common)
    server, port, health_servicer, node, registration = build(TrainerSettings(), StorageSettings(), SecuritySettings())
    server.start()
    registration.start()
    logging.getLogger("segtrain.trainer").info("trainer node listening on port %d", port)
    observability.serve(common.prometheus_listen, "trainer")
    print(f"READY trainer {port}", flush=True)

    serve_until_signalled(server, health_servicer, common.shutdown_grace_s,
                          on_stop=lambda: shut_down(node, registration, grace_s=common.shutdown_grace_s))


if __name__ == "__main__":
    main()
