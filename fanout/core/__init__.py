"""Sans-I/O core: plain functions and classes with no sockets, no asyncio, no NATS."""
