"""Triton kernels of shortrt, each file holding a kernel, its launcher and its torch reference.

A leaf of the package: it imports nothing else of shortrt. Triton itself is optional: every kernel
module imports without it and falls back to its torch reference on the CPU.
"""
