"""The benchmark harness: `python -m bench` prints jobs/s, latency percentiles, memory and
the versions it ran with. Benchmarks are not tests: nothing here asserts a figure."""
