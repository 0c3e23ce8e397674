"""fanout: a multiprocess, sharded NATS -> WebSocket fan-out gateway."""

__version__ = "0.1.0"
