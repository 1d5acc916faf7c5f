"""The gateway: one HTTP port for every API; routes, queues, measures."""
