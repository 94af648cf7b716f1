"""The decode side: the continuous-batching scheduler and the engine that steps it.

With chunked prefill mixed into its decode steps this engine is also role `both`, the colocated baseline.
"""
