"""Benchmark scripts that must not rot (benchmarks/gpu_run.sh on the CPU)."""
