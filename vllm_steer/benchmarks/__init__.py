"""Benchmarks: run as ``python -m vllm_steer.benchmarks.<name>``."""
