"""Few-shot evaluation: prompts, RICES, decoding, close-ended scoring and metrics."""
