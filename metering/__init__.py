"""Metering: usage events, the append-only ledger, tenants and keys, Prometheus metrics."""
