"""rora-fast benchmark suite (pytest-benchmark); see benchmarks/README.md."""
