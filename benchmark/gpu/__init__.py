"""The paper profile on a lent GPU: prepare here, run there, import the rows here.

A lent GPU machine (see the README, "Running the paper profile on a GPU") gets a copy of the working
tree plus up to 8 git-ignored paths, runs ONE shell command of at most 10 minutes, has no network and
lacks polars and jsonargparse. So the work is split in three:

- :mod:`benchmark.gpu.prepare` (``make gpu-prepare``, on the CPU, here): wheels into ``.whl/`` and
  everything slow or impossible there into ``.carry/`` (prepared data caches, item embeddings,
  semantic IDs, the commit), within the 64 MiB that travels;
- ``benchmark/gpu/run.sh`` (``make gpu-bench``, there): installs the wheels, runs
  :mod:`benchmark.gpu.bench`, which fits the next missing paper rows under a deadline and leaves an
  archive of rows and run directories in ``$OUT``;
- :mod:`benchmark.gpu.import_rows` (``make gpu-import``, here): validates the archive and appends
  the rows that pass to ``results/``.

This package's ``__init__`` and :mod:`benchmark.gpu.unpack` import nothing outside the standard
library: they run before the wheels are installed.
"""
