"""Clients of segtrain: the Python SDK (clients.sdk), the `segtrain` CLI (clients.cli) and the
local stack launcher (clients.stack)."""
