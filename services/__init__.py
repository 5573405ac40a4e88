"""segtrain's three gRPC services and the infrastructure they share (services.common)."""
