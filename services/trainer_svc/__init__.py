"""A trainer node: runs assigned jobs in background threads, streams their events, checkpoints
to object storage, and runs analysis with registered models."""
