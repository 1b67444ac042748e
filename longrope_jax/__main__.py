from longrope_jax.cli import main

raise SystemExit(main())
