"""Quickstart: RigL at 90% ERK sparsity on MNIST-1D with the 64-channel 1D CNN.

Finishes in a few minutes on 2 CPU cores. Same as rigl_mnist1d.py, kept as its
own file so the README's first command never changes meaning.
"""

from configs import rigl_mnist1d


def get_config(arg=None):
    return rigl_mnist1d.get_config(arg)
