"""Sampling: images from a model (``generate``), and files from a model file (``sample_to_files``)."""

from robuq.sample.generate import generate, guided, save_grid, to_uint8

__all__ = ["generate", "guided", "save_grid", "to_uint8"]
