"""The tenant API beyond the OpenAI endpoints, with an API key: the tenant's own usage and invoices."""

from __future__ import annotations

from fastapi import APIRouter

from serving.tenant import invoices, usage

ROUTERS: tuple[APIRouter, ...] = (invoices.router, usage.router)
