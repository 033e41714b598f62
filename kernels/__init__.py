"""Triton kernels of shortrt, each file holding a kernel, its launcher and its torch reference.

Installed as the package ``shortrt.kernels``. Triton itself is optional: every kernel
module imports without it and falls back to its torch reference on the CPU.
"""
