"""A trainer node: runs each assigned job attempt in its own process group (data-parallel on
torch.distributed when asked), streams its events, checkpoints to object storage, and runs
analysis with registered models."""
