"""Fleet state: the endpoints (registry, an in-memory copy of the database), their probes and cached
models, the per-endpoint circuit breakers, the candidates for a model, control messages between
processes and the configuration services. May import upstream, auth, observability and core."""
