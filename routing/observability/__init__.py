"""Instruments shared by every layer: the metrics and the timed locks. Imports nothing of routing
but core."""
