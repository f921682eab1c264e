"""Adapters that plug robuq into other libraries' loading paths (diffusers' quantizer mapping)."""
