"""The router: OpenAI-compatible HTTP for clients, ZeroMQ to the workers (see docs/design.md)."""
