"""The worker child process: listen, claim, run, complete.

Follow one job: :class:`~qdworker._db.listen.Listener` wakes the worker on ``NOTIFY
qdworker_jobs``; :mod:`.claimer` claims due rows in batches (``FOR UPDATE SKIP LOCKED``) with a
lease and puts them, as :class:`~.run.Run` objects, into the :mod:`.flow`; :mod:`.runner` runs
each handler with its context, timeout and cancel scope; :mod:`.completer` writes outcomes in
fenced batches and inserts retry and cron successors; :mod:`.leases` renews what the flow holds
from a thread and stops runs whose lease is in doubt; :mod:`.outbox` sends events to the
supervisor. :mod:`.worker` assembles them; :mod:`.main` is the process's entry point.
"""
