"""The `segtrain` command line."""
