"""Kernel fusion: fragments -> generated kernels -> launches over (packed) trees."""
