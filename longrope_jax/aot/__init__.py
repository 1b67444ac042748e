"""Ahead-of-time compilation for TPU slices without a TPU: topologies, abstract programs, reports."""
