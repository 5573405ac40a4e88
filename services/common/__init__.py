"""Infrastructure shared by every service: settings, object store, database, server bootstrap,
resource names, domain errors and their one mapping to gRPC status codes."""
