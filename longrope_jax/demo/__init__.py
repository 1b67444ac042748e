"""`longrope-jax demo`: the end-to-end context-extension study (plan, stages, report, export)."""
