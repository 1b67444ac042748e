"""Mesh, logical-axis rules, sharded init, multi-host start and global batches."""
