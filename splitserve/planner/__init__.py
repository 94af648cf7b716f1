"""The prefill:decode ratio planner: profile the workers on this hardware, simulate a workload on every
split of a number of workers, and recommend the split with the highest goodput per worker."""
