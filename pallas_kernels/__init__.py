"""Pallas kernels (TPU, GPU) with plain-XLA CPU paths for block-sparse and N:M matmuls.

The kernels arrive with their own issue; nothing is exported yet.
"""
