"""Language-aware routing: a routed model name (`auto`, or any name under `routes:` in
configs/models.yaml) becomes, per request, the best served model for the prompt's detected language.

Each model may state its languages with a rank (`languages: {ru: 1, kk: 2}`, 1 = first choice). For a
request to a routed name in language L, the candidates (the route's `models`, default: every model that
states languages) that the tenant may use and that have a healthy worker are ordered by their rank for
L (then by their order in the catalogue); the first one serves. When none states L (or the language is
undetermined), or none of those is usable, the route's `fallback` (default: the catalogue's
`default_model`) serves; failing that, the first usable candidate. The pipeline calls `resolve` right
after attribution (serving/pipeline.py step 5): the request body, the admission, the meter and the usage
event carry the model that actually serves, the worker answers under its name (the response's `model`),
and the response says so in `X-Tokenport-Routed-Model`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from serving.errors import ModelNotFound
from serving.proxy.pool import WorkerPool
from serving.settings import Catalogue

HEADER = "X-Tokenport-Routed-Model"


@dataclass(frozen=True)
class Route:
    name: str
    candidates: tuple[str, ...]  # in catalogue order
    ranks: Mapping[str, Mapping[str, int]]  # model -> language -> rank
    fallback: str | None


class LanguageRouter:
    def __init__(self, routes: Iterable[Route], pool: WorkerPool) -> None:
        self._routes = {r.name: r for r in routes}
        self._pool = pool

    @classmethod
    def from_catalogue(cls, catalogue: Catalogue, pool: WorkerPool) -> LanguageRouter:
        ranks = {m.name: dict(m.languages) for m in catalogue.models}
        routes = []
        for spec in catalogue.routes:
            names = (
                spec.models if spec.models is not None else [m.name for m in catalogue.models if m.languages]
            )
            routes.append(
                Route(
                    spec.name,
                    tuple(names),
                    {n: ranks.get(n, {}) for n in names},
                    spec.fallback or catalogue.default_model,
                )
            )
        return cls(routes, pool)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._routes)

    def routes(self, model: str) -> bool:
        """Whether `model` is a routed name."""
        return model in self._routes

    def _healthy(self, model: str) -> bool:
        return any(w.healthy and not w.draining for w in self._pool.workers if w.model == model)

    def choose(self, name: str, language: str | None, may_use: Callable[[str], bool]) -> str:
        """The model that serves a request to the routed `name` in `language`."""
        route = self._routes[name]
        allowed = [
            m
            for m in dict.fromkeys((*route.candidates, route.fallback))
            if m is not None and may_use(m) and self._pool.serves(m)
        ]
        if not allowed:
            raise ModelNotFound(
                f"The model '{name}' does not exist or you do not have access to it.", param="model"
            )
        healthy = [m for m in allowed if self._healthy(m)]
        ranked = sorted(
            (route.ranks[m][language], i, m)
            for i, m in enumerate(healthy)
            if m in route.ranks and language is not None and language in route.ranks[m]
        )
        if ranked:
            return ranked[0][2]
        if route.fallback in healthy:
            return route.fallback
        return (healthy or allowed)[0]  # none healthy: the forwarder answers 503 (no healthy worker)

    def resolve(self, body: dict[str, Any], language: str | None, may_use: Callable[[str], bool]) -> str:
        """Route the request: its body's `model` becomes the serving model, which is returned."""
        model: str = self.choose(body["model"], language, may_use)
        body["model"] = model
        return model
