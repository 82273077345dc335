"""The Ollama API: the model-routed views (chat, generate, embed, embeddings, show), loading and
unloading, and the fleet-wide views (tags, ps, version, pull, push, create, copy, delete)."""
