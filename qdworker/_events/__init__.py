"""Job events and user notifications on their way to websocket clients (private).

A supervisor hands each event its workers report to its :mod:`.hub`, which fans it out to the
subscribed clients of this supervisor, each through a bounded queue, and to its
:mod:`.relay`, which forwards it through Postgres (:mod:`.relay_publisher`, NOTIFY
``qdworker_events``) to the other supervisors that have clients (:mod:`.presence`) and feeds
their messages to the local hub. :mod:`.websocket` serves the clients (handshake and token
check in :mod:`._handshake`, one client's session in :mod:`._connection`); :mod:`.tokens`
makes and checks client tokens.
"""
