"""The router's cluster side: the workers (`membership`), every request in flight and the socket to the workers
(`cluster`), where requests go (`placement`, `prefix_index`, `policy`), pool roles (`roles`), attempts (`jobs`),
what `/health` and `/metrics` show (`snapshot`, `metrics`), and its options (`options`)."""
