"""``python -m qdworker bench``: how fast qdworker drains, enqueues and wakes up.

Modules: :mod:`.jobs` (the no-op job type the benchmark's workers import), :mod:`.procs`
(CPU and memory of processes from ``/proc``), :mod:`.workloads` (each measurement),
:mod:`.cli` (the ``bench`` subcommand). See ``docs/benchmarks.md``.
"""
