"""The SLO benchmark: workloads, a streaming load generator for any OpenAI-compatible server, latency and
goodput metrics (defined as vLLM's `bench serve` defines them), and plots. `splitserve bench` runs it."""
