"""Gradient transformations (optax names and meaning)."""
