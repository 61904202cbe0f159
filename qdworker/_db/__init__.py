"""Postgres access: connections driven from async code, named statements, migrations and
the embedded server."""
