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
    server, port, health_servicer, node, registration = build(TrainerSettings(), StorageSettings(), SecuritySettings())
    server.start()
    registration.start()
    logging.getLogger("segtrain.trainer").info("trainer node listening on port %d", port)
    print(f"READY trainer {port}", flush=True)

    def stop() -> None:
        # Hand running jobs back at the next batch: the pipeline service re-queues them at once and
        # another node resumes from the last full-state checkpoint. A node that dies instead
        # (SIGKILL) loses its lease and the same happens after the lease period.
        node.draining = True
        registration.announce_draining()
        runs = node.runs.active()
        for run in runs:
            run.hand_back()
        for run in runs:
            run.wait_finished(common.shutdown_grace_s)
        registration.stopping.set()

    serve_until_signalled(server, health_servicer, common.shutdown_grace_s, on_stop=stop)


if __name__ == "__main__":
    main()
