"""One module per CLI command; each has ``register(subparsers)`` (found by
:func:`fvsanity.cli.list_commands`, so nothing is exported here)."""

__all__: list[str] = []
