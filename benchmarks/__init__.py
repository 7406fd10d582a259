"""mpiengine's benchmark suite: ``python benchmarks/run.py`` (see docs/performance.md).

Layout: ``run`` (the command), ``suite`` (the operations, on mpiengine and
ipyparallel alike), ``lifecycle`` (start, idle, scaling), ``floors`` with
``floor_mpi`` and ``floor_socket`` (raw MPI and TCP), ``memory`` (``--memory``,
``--huge``), ``report`` (the table and targets), ``clusters`` and ``procs``
(starting clusters and ending every process by pid).
"""
