"""Test helpers for the stats migration tests: move the test database to a migration and get
the token tables' historical models there (Django's MigrationExecutor, as `migrate` does)."""

from __future__ import annotations

from typing import Any

from django.db import connection
from django.db.migrations.executor import MigrationExecutor

Targets = list[tuple[str, str]]


def migrate(targets: Targets) -> MigrationExecutor:
    """Apply or unapply migrations until the database stands at `targets`."""
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor


def token_models(targets: Targets) -> tuple[Any, Any, Any]:
    """Migrate to `targets`; TokenTotal, TokenTimeSeries and TokenDaily as they are there."""
    apps = migrate(targets).loader.project_state(targets).apps
    return (
        apps.get_model("stats", "TokenTotal"),
        apps.get_model("stats", "TokenTimeSeries"),
        apps.get_model("stats", "TokenDaily"),
    )


def migrate_to_latest() -> None:
    """Every app back at its last migration (a migration test's clean-up)."""
    migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())
