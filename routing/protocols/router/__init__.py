"""The router's own routes: /health and /metrics."""
