"""The router's HTTP side: the OpenAI-compatible app (`app`), its request schema and response shapes, tool
calls, incremental text output, and the process that serves it (`server`). It reads the cluster side
(`router.cluster`) to place requests; the cluster side never imports it."""
