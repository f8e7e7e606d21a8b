"""Tensor-network factorizations (CP, Tucker, TT, tubal) and factorized Flax layers.

The formats and layers arrive with their own issue; nothing is exported yet.
"""
