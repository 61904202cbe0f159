"""``python -m qdworker bench``: how fast qdworker drains, enqueues and wakes up.

Modules: :mod:`.jobs` (the no-op job type the benchmark's workers import), :mod:`.procs`
(the supervisor under test as a subprocess; CPU and memory of processes from ``/proc``),
:mod:`.workloads` (the workloads by name and the order they run in; one private module per
workload, e.g. :mod:`._drain`), :mod:`.cli` (the ``bench`` subcommand). See
``docs/benchmarks.md``.
"""
