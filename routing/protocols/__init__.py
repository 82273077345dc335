"""Protocol adapters, one package per client API (ollama, openai, the router's own /health and
/metrics in router), translation between them, and what they share (common: parsing, schemas,
relays, stream scanners). They check a request, plan the upstream attempt and hand it to the engine.
May import status, engine, fleet, upstream, auth, observability and core; never server."""
