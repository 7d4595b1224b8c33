"""Speed and memory benchmarks of the dual-head KD loss (``pytest benchmarks/ --benchmark-only``)."""
