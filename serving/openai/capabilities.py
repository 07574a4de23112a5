"""What each catalogue model offers, by its `kind` (configs/models.yaml): which metered routes it
serves (serving/openai/routes.py `Route.capability`) and what GET /v1/models tells a buyer.

A model the catalogue does not describe (a `--worker MODEL=URL` given on the command line) is taken
for a generative model, as before the catalogue had kinds.
"""

from __future__ import annotations

from serving.settings import Catalogue, ModelSpec

GENERATE: tuple[str, ...] = ("chat", "completions", "responses", "batch")
EMBEDDING: tuple[str, ...] = ("embeddings", "batch")


def of(spec: ModelSpec | None) -> tuple[str, ...]:
    return EMBEDDING if spec is not None and spec.kind == "embedding" else GENERATE


class Capabilities:
    """model name -> its capabilities, read from the catalogue once."""

    def __init__(self, catalogue: Catalogue) -> None:
        self._by_model = {m.name: of(m) for m in catalogue.models}

    def __call__(self, model: str) -> tuple[str, ...]:
        return self._by_model.get(model, GENERATE)
