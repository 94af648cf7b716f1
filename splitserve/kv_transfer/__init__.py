"""KV page transfer between a prefill and a decode worker over UCX (see docs/design.md)."""
