"""The version of skntk (its own module, so that any module can read it without importing
the package and everything it exports)."""

__version__ = "0.1.0.dev0"
