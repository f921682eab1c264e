"""robuq's version: one place, read by the package, the command line and the build (pyproject.toml)."""

__version__ = "0.1.0"
