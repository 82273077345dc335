"""Read-only views of the router's state: the snapshot of endpoints, slots and queues that feeds the
page, /metrics gauges and the NOMYO usage API. Reads engine and fleet; nothing below imports it."""
