"""The pipeline service (control plane): pipelines, training sets, jobs and their state machine,
the model registry, analysis requests and the trainer-node registry and scheduler."""
