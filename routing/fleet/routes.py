"""Model aliases and fallback chains as the hot path sees them: an immutable copy of the
ModelAlias and FallbackChain tables, loaded with the endpoints by the registry
(routing/fleet/registry.py) and replaced whole on every reload.

Resolution is one level each way, so it always ends:
- an alias stands for its targets, which are real model names (never aliases again);
- a name's fallback chain is `(name, *fallbacks)`; a fallback's own chain is not followed.
Keys are `model_key` spellings (`m` is `m:latest`); disabled rows are not loaded.

A client key's allowed models (routing/auth/principal.py) name real models. An alias is judged
by its targets (`may_use`): a key may use it when it may use at least one of them, and then
reaches only those (routing/engine/proxy.py filters the candidates). An alias's own name grants
nothing, so an alias cannot widen a key (`llama3-big` -> `mistral` is refused to a key of
`llama3*`), and a key of `qwen2:7b` may use an alias that stands for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from routing.auth.principal import Principal, refuse_model
from routing.core.names import model_key, name_list
from routing.models import FallbackChain, ModelAlias


def _frozen(d: dict[str, tuple[str, ...]]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType(d)


@dataclass(frozen=True, slots=True)
class Alias:
    name: str  # as the admin wrote it (what listings show)
    targets: tuple[str, ...]  # real model names, in the admin's order


@dataclass(frozen=True, slots=True)
class ModelRoutes:
    aliases: Mapping[str, Alias] = field(default_factory=lambda: MappingProxyType({}))  # by alias key
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _frozen({}))  # by name key

    def alias(self, name: str) -> Alias | None:
        """The alias called `name` (any spelling of it), or None for a plain model name."""
        return self.aliases.get(model_key(name)) if self.aliases else None

    def targets(self, name: str) -> tuple[str, ...]:
        """The real model names `name` stands for: an alias's targets, else `name` itself."""
        alias = self.alias(name)
        return alias.targets if alias is not None else (name,)

    def may_use(self, principal: Principal, name: str) -> bool:
        """Whether `principal` may ask for `name`: a plain model by its name, an alias by its
        targets (at least one; see the module docstring)."""
        if not principal.models:
            return True
        return any(principal.may_use(target) for target in self.targets(name))

    def require(self, principal: Principal, name: str) -> None:
        """Raise ApiError 403 (`model_not_allowed`) unless `principal` may ask for `name`."""
        if not self.may_use(principal, name):
            refuse_model(principal, name)

    def chain(self, name: str) -> tuple[str, ...]:
        """The names to try for a request for `name`, in order: itself, then its fallbacks."""
        after = self.fallbacks.get(model_key(name)) if self.fallbacks else None
        return (name, *after) if after else (name,)


NONE = ModelRoutes()


def build(aliases: list[tuple[str, str]], chains: list[tuple[str, str]]) -> ModelRoutes:
    """From (name, targets text) and (model, fallbacks text) rows as stored (name lists as
    routing/core/names.py `name_list` reads them). Rows left without a name are skipped."""
    by_alias: dict[str, Alias] = {}
    for name, targets in aliases:
        found = tuple(name_list(targets))
        if name.strip() and found:
            by_alias.setdefault(model_key(name), Alias(name.strip(), found))
    by_model: dict[str, tuple[str, ...]] = {}
    for model, fallbacks in chains:
        found = tuple(name_list(fallbacks))
        if model.strip() and found:
            by_model.setdefault(model_key(model), found)
    if not by_alias and not by_model:
        return NONE
    return ModelRoutes(MappingProxyType(by_alias), _frozen(by_model))


def load_routes() -> ModelRoutes:
    """The enabled aliases and chains from the database (a worker thread; the registry's reload)."""
    aliases = list(ModelAlias.objects.filter(enabled=True).values_list("name", "targets"))
    chains = list(FallbackChain.objects.filter(enabled=True).values_list("model", "fallbacks"))
    return build(aliases, chains)
