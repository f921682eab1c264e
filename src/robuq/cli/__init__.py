"""The ``robuq`` command line: thin subcommands over the library, and the main job (``robuq run``)."""

from robuq.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
