"""Runs a trainer node: `python -m services.trainer_svc`."""

from __future__ import annotations

import logging
import os

from services.common.server import configure_logging, serve_until_signalled
from services.common.settings import SecuritySettings, ServerSettings, StorageSettings, TrainerSettings
from services.trainer_svc.app import build


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub is ever contacted
    common = ServerSettings()
    configure_logging(common.log_level)
    server, port, health_servicer, _node, registration = build(TrainerSettings(), StorageSettings(), SecuritySettings())
    server.start()
    registration.start()
    logging.getLogger("segtrain.trainer").info("trainer node listening on port %d", port)
    print(f"READY trainer {port}", flush=True)

    def stop() -> None:
        # Running jobs are not cancelled: their leases lapse and the pipeline service re-queues
        # them, to resume from their last checkpoint on another node.
        registration.draining = True
        registration.stopping.set()

    serve_until_signalled(server, health_servicer, common.shutdown_grace_s, on_stop=stop)


if __name__ == "__main__":
    main()
