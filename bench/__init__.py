"""genfuse benchmarks (installed as genfuse.bench so that `genfuse bench` can reach them)."""
