"""The OpenAI-compatible API (/v1/): chat completions, completions, embeddings, models."""
