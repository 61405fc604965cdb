"""cxygpt-bench: load generator for OpenAI-compatible endpoints, and the benchmark suite against the peers."""
