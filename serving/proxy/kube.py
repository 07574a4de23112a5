"""`discover: endpointslices`: a Kubernetes Service's ready endpoints, read from the API server.

One GET per look (`/apis/discovery.k8s.io/v1/namespaces/NS/endpointslices?labelSelector=
kubernetes.io/service-name=SVC`), with the pod's ServiceAccount token (re-read every time: bound tokens
rotate) and the cluster CA, as every in-cluster client does. A list, not a watch: the discovery loop
asks every `workers.refresh_s`, which is all a fleet of inference workers needs, and it keeps
this client to one request shape that a fake API server tests completely.

Why EndpointSlices besides DNS: an endpoint is listed with its conditions, so a pod that is
terminating (`ready: false`) leaves the gateway's set as soon as Kubernetes marks it, before its DNS
record expires from caches, and no DNS TTL delays a new pod. The ServiceAccount needs `list` on
`endpointslices` (group `discovery.k8s.io`) in the workers' namespace.

The entry's base_url names the Service: `http://SERVICE.NAMESPACE[.svc[.cluster.local]]:PORT/...`
(without a namespace, the gateway pod's own). Of the slice's ports, the only one, else the one whose
number is base_url's port, else the one named `http`.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from serving.proxy.discovery import LookupFailed

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def service_of(base_url: str, default_namespace: str | None) -> tuple[str, str, int | None]:
    """(service, namespace, port) named by an entry's base_url."""
    url = urlsplit(base_url)
    parts = (url.hostname or "").split(".")
    service = parts[0]
    namespace = parts[1] if len(parts) > 1 and parts[1] else default_namespace
    if not namespace:
        raise LookupFailed(f"{base_url} names no namespace (SERVICE.NAMESPACE) and this is not a pod")
    return service, namespace, url.port


def ready_endpoints(slices: list[dict[str, Any]], port: int | None) -> list[tuple[str, int]]:
    """(address, port) of every ready endpoint in a Service's EndpointSlices."""
    out: set[tuple[str, int]] = set()
    for sl in slices:
        if sl.get("addressType") not in ("IPv4", "IPv6"):
            continue  # FQDN slices are not pods
        ports = [p for p in sl.get("ports") or [] if isinstance(p, dict) and isinstance(p.get("port"), int)]
        chosen: dict[str, Any] | None = None
        if len(ports) == 1:
            chosen = ports[0]
        else:
            chosen = next((p for p in ports if p["port"] == port), None) or next(
                (p for p in ports if p.get("name") == "http"), None
            )
        if chosen is None:
            continue
        for ep in sl.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            if cond.get("ready") is False:  # nil means ready (the API's rule); terminating pods are not
                continue
            for address in ep.get("addresses") or []:
                out.add((str(address), int(chosen["port"])))
    return sorted(out)


class EndpointSlices:
    """The lookup for `discover: endpointslices` (serving/proxy/discovery.py `Lookup`); it makes no
    connection until an entry asks."""

    def __init__(
        self,
        *,
        api_url: str | None = None,
        sa_dir: Path = SA_DIR,
        timeout_s: float = 5.0,
    ) -> None:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if api_url is None and host:
            api_url = f"https://{'[' + host + ']' if ':' in host else host}:{port or 443}"
        self.api_url = api_url
        self.sa_dir = sa_dir
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _namespace(self) -> str | None:
        try:
            return (self.sa_dir / "namespace").read_text().strip() or None
        except OSError:
            return None

    def _headers(self) -> dict[str, str]:
        try:
            token = (self.sa_dir / "token").read_text().strip()
        except OSError:
            return {}
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _ssl(self) -> ssl.SSLContext | bool:
        ca = self.sa_dir / "ca.crt"
        return ssl.create_default_context(cafile=str(ca)) if ca.is_file() else True

    async def list_slices(self, service: str, namespace: str) -> list[dict[str, Any]]:
        if self.api_url is None:
            raise LookupFailed("not running in Kubernetes (no KUBERNETES_SERVICE_HOST) and no API URL given")
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl()))
        url = f"{self.api_url.rstrip('/')}/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        params = {"labelSelector": f"kubernetes.io/service-name={service}"}
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            get = self._session.get(url, params=params, headers=self._headers(), timeout=timeout)
            async with get as resp:
                if resp.status != 200:
                    text = (await resp.text())[:300]
                    hint = (
                        " (the gateway's ServiceAccount needs `list` on endpointslices.discovery.k8s.io)"
                        if resp.status in (401, 403)
                        else ""
                    )
                    raise LookupFailed(f"Kubernetes API answered {resp.status}{hint}: {text}")
                body = await resp.json()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise LookupFailed(f"Kubernetes API: {type(exc).__name__}: {exc}") from exc
        items = body.get("items") if isinstance(body, dict) else None
        return [i for i in items or [] if isinstance(i, dict)]

    async def __call__(self, kind: str, base_url: str) -> list[tuple[str, int]]:
        service, namespace, port = service_of(base_url, self._namespace())
        slices = await self.list_slices(service, namespace)
        try:
            return ready_endpoints(slices, port)
        except (TypeError, AttributeError, KeyError, ValueError) as exc:  # not the API's shape
            raise LookupFailed(f"Kubernetes API: a malformed EndpointSlice of {service}: {exc!r}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
