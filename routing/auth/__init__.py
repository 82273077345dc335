"""Who is calling: the principal of a request and the router key. May import observability and core."""
