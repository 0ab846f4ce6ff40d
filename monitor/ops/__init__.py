"""What runs beside the flow: HTTP endpoints, metrics, scheduled jobs, state checkpoints, logging."""
