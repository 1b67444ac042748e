"""Evaluation: method specs, sliding-window perplexity, passkey retrieval, reports."""
