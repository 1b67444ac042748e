"""`python -m longrope_jax`: the same command line as `longrope-jax`."""

from longrope_jax.cli import main

raise SystemExit(main())
