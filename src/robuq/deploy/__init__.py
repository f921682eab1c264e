"""Deployment: packed low-bit files and integer inference."""
