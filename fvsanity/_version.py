"""The package version, in a module of its own so that any module can read it without importing
the ``fvsanity`` package root (which imports the model registry and ``fvsanity.fool``)."""

__version__ = "0.1.0"
