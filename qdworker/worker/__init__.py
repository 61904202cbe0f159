"""The worker child process: listen, claim, run, complete.

Follow one job: :mod:`.listener` wakes on ``NOTIFY qdworker_jobs``; :mod:`.claimer` claims due
rows in batches (``FOR UPDATE SKIP LOCKED``) with a lease; :mod:`.runner` runs each handler
with its context, timeout and cancel scope; :mod:`.completer` writes results in fenced batches
and inserts retry and cron successors; :mod:`.leases` renews leases from a thread and replaces
the process if a handler blocks it; :mod:`.outbox` sends events to the supervisor.
"""
