"""LongRoPE search: the search space, evolution, perplexity fitness, and the CLI."""
