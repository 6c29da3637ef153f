"""The package version (one place; the package and the run provenance read it)."""

__version__ = "0.1.0"
