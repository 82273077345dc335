"""The bottom layer: error replies in each protocol's shape and model-name rules. Imports nothing of
routing."""
