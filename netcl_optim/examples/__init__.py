"""Runnable examples: ``python -m netcl_optim.examples.quickstart``, ``...examples.digits``."""
