"""The bottom layer: error replies in each protocol's shape, model-name rules, signals and the Redis
clients. Imports nothing of routing."""
