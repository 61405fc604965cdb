"""Services on the dev cluster's network, the parts kube-proxy and the cluster DNS play: each Service's cluster IP
and port forwards a connection to one of its ready endpoints (kube-proxy's old userspace mode: cluster IPs are local
addresses of this network), and `<service>.<namespace>.svc.cluster.local` resolves to the cluster IP (a headless
Service's to its ready endpoints) at kube-dns's address."""
from __future__ import annotations

import asyncio
import itertools
import logging

import aiohttp
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from .network import relay
from .watching import follow

log = logging.getLogger("cxygpt.services")
DOMAIN = "svc.cluster.local."
DNS_TTL_S = 5
MAX_QUERY_BYTES = 512


class Services:
    """The Services and EndpointSlices the API holds, and the listeners and answers made from them."""

    def __init__(self):
        self.services: dict[tuple[str, str], dict] = {}
        self.slices: dict[tuple[str, str], dict] = {}
        self.listeners: dict[tuple[str, int], tuple[asyncio.Server, tuple[str, str], dict]] = {}
        self.turn = itertools.count()

    # --- what the API says ---------------------------------------------------------------------------------------

    def endpoints(self, namespace: str, service: str, port: dict) -> list[tuple[str, int]]:
        """The ready endpoints of one port of a Service: (address, port)."""
        found = []
        for (ns, _), slice_ in self.slices.items():
            labels = slice_["metadata"].get("labels") or {}
            if ns != namespace or labels.get("kubernetes.io/service-name") != service:
                continue
            number = next((p.get("port") for p in slice_.get("ports") or []
                           if (p.get("name") or "") == (port.get("name") or "")), None)
            if number is None:
                continue
            for endpoint in slice_.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready", True):
                    found += [(address, number) for address in endpoint.get("addresses") or []]
        return sorted(set(found))

    def resolve(self, name: str) -> list[str] | None:
        """The addresses of <service>.<namespace>.svc.cluster.local; None for a name that is not a Service."""
        if not name.endswith("." + DOMAIN):
            return None
        parts = name[:-len(DOMAIN) - 1].split(".")
        if len(parts) != 2:
            return None
        service = self.services.get((parts[1], parts[0]))
        if service is None:
            return None
        cluster_ip = service["spec"].get("clusterIP")
        if cluster_ip and cluster_ip != "None":
            return [cluster_ip]
        return sorted({a for port in service["spec"].get("ports") or [{}]
                       for a, _ in self.endpoints(parts[1], parts[0], port)})

    # --- the proxy ---------------------------------------------------------------------------------------------------

    async def sync_listeners(self) -> None:
        wanted = {}
        for key, service in self.services.items():
            ip = service["spec"].get("clusterIP")
            if not ip or ip == "None":
                continue
            for port in service["spec"].get("ports") or []:
                if port.get("protocol", "TCP") == "TCP":
                    wanted[(ip, port["port"])] = (key, port)
        for address in set(self.listeners) - set(wanted):
            server, _, _ = self.listeners.pop(address)
            server.close()
        for address, (key, port) in wanted.items():
            if address in self.listeners:
                server, _, _ = self.listeners[address]
                self.listeners[address] = (server, key, port)
                continue
            try:
                server = await asyncio.start_server(lambda r, w, a=address: self._forward(a, r, w), *address)
            except OSError as e:
                log.warning("service %s/%s: cannot listen on %s:%d: %s", *key, *address, e)
                continue
            self.listeners[address] = (server, key, port)

    async def _forward(self, address: tuple[str, int], reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        _, (namespace, name), port = self.listeners.get(address, (None, ("", ""), {}))
        endpoints = self.endpoints(namespace, name, port)
        if not endpoints:  # as kube-proxy rejects a connection to a Service with no endpoint
            writer.close()
            return
        host, number = endpoints[next(self.turn) % len(endpoints)]
        await relay(reader, writer, host, number)

    # --- the DNS ----------------------------------------------------------------------------------------------------

    def answer(self, wire: bytes) -> bytes | None:
        """The reply to one DNS query (A and AAAA of Service names; anything else outside the cluster is refused:
        this network reaches nothing else)."""
        if len(wire) > MAX_QUERY_BYTES:
            return None
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 (dnspython raises many kinds for a malformed packet)
            return None
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        if not query.question:
            reply.set_rcode(dns.rcode.FORMERR)
            return reply.to_wire()
        question = query.question[0]
        name = question.name.to_text().lower()
        addresses = self.resolve(name)
        if addresses is None:
            reply.set_rcode(dns.rcode.NXDOMAIN if name.endswith("cluster.local.") else dns.rcode.REFUSED)
        elif question.rdtype == dns.rdatatype.A and addresses:
            reply.answer.append(dns.rrset.from_text_list(question.name, DNS_TTL_S, "IN", "A", addresses))
        return reply.to_wire()


class _Dns(asyncio.DatagramProtocol):
    def __init__(self, services: Services):
        self.services = services

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        reply = self.services.answer(data)
        if reply is not None:
            self.transport.sendto(reply, addr)


async def run(session: aiohttp.ClientSession, server: str, dns_address: str) -> None:
    """Follows Services and EndpointSlices, keeps the listeners in step, and answers DNS on kube-dns's address."""
    services = Services()
    changed = asyncio.Event()

    def keeper(store: dict):
        async def handle(kind, obj):
            md = obj.get("metadata") or {}
            key = (md.get("namespace"), md.get("name"))
            if kind == "DELETED":
                store.pop(key, None)
            elif kind in ("ADDED", "MODIFIED"):
                store[key] = obj
            changed.set()
        return handle

    async def keep_listening():
        while True:
            await changed.wait()
            changed.clear()
            await services.sync_listeners()

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Dns(services), local_addr=(dns_address, 53))
    try:
        await asyncio.gather(
            follow(session, f"{server}/api/v1/services?watch=true", keeper(services.services), "services",
                   errors=(RuntimeError, LookupError)),
            follow(session, f"{server}/apis/discovery.k8s.io/v1/endpointslices?watch=true", keeper(services.slices),
                   "endpointslices", errors=(RuntimeError, LookupError)),
            keep_listening())
    finally:
        transport.close()
        for server_, _, _ in services.listeners.values():
            server_.close()
