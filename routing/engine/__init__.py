"""The forwarding engine: one path (`proxy.forward`) for every routed request: select a candidate,
reserve a slot on the usage board (and in the cluster), send the attempt, relay the reply and account
for it. May import fleet, upstream, auth, observability and core; never protocols or server."""
