"""Speed and memory measurements; each script writes its figures to ``results/perf/``."""
