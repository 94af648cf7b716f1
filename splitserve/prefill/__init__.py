"""The prefill side: prompt batching and the hand-off of KV pages to kv_transfer (see docs/design.md)."""
