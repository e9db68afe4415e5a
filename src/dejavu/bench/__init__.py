"""Benchmarks: decode (CPU or GPU, eager), kernels and e2e (GPU). Import the modules."""
