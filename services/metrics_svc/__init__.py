"""The metrics service: the persisted event log of every job, epoch history, charts and
resumable live watch streams."""
