"""Triton kernels of sfd_fast (installed as sfd_fast.kernels)."""
