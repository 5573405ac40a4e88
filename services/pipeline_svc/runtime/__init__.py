"""What runs by itself: the trainer-node registry, the scheduler that assigns queued jobs, the
relays that move events to the metrics service, and analyses on a node. Built on resources/;
the only part of the pipeline service that holds stubs of other services (peers.py)."""
