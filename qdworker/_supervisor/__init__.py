"""The supervisor process (private): worker children, IPC, the websocket side and the
embeddable :func:`qdworker.serve`, defined in :mod:`.main`.

``manager = await nursery.start(qdworker.serve, config)`` runs it inside a trio app;
``python -m qdworker`` runs it standalone (see :mod:`qdworker._cli`).
"""
