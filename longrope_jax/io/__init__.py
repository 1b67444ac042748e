"""Checkpoint I/O: HF safetensors, Orbax params, the param map, files, and model artifacts by spec."""
