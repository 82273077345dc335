"""Server plumbing: the lean ASGI handler of the proxy routes, the daphne hooks, the front door
(`/`, CORS) and the process lifecycle (start-up, background tasks, drain, shutdown) plus the wiring
done in `RoutingConfig.ready`. The top layer: it may import every other routing package; nothing in
routing imports it."""
