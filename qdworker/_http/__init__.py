"""The supervisor's HTTP surface: health probes, Prometheus metrics and the dashboard.

:func:`~.server.serve` runs hypercorn's trio server with the Starlette app that
:func:`~.app.build_app` assembles from the route modules (``health``, ...). The app reads the
supervisor through the narrow :class:`~.app.SupervisorView` and the database through its own
connections, so every supervisor serves the same view of the whole cluster.
"""
