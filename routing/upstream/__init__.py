"""All upstream HTTP: the pooled session and client per event loop, timeouts, and what a failure says
about the server (failures). May import observability and core only."""
