"""Commands and tools: the CLI, pull (downloads), a local cluster, trace, benchmarks."""
