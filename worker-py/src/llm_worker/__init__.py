"""LLM serving worker: BullMQ jobs in, tokens out over Redis pub/sub (docs/PROTOCOL.md)."""

__version__ = "0.1.0"
