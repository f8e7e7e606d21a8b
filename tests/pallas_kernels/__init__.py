"""Tests for pallas_kernels: formats, kernels (interpret mode), XLA paths, gradients."""
