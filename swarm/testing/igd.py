"""A fake UPnP Internet Gateway Device on loopback, for port-mapping tests: it serves a root
description and answers the WANIPConnection SOAP actions a client library sends
(GetStatusInfo, GetExternalIPAddress, AddPortMapping, DeletePortMapping, ...), recording
every mapping request.

    async with open_fake_igd(external_ip="127.0.0.1") as igd:
        igd.root_url       # "http://127.0.0.1:PORT/rootDesc.xml", give it to the mapper
        igd.mappings       # {(external port, "TCP"): (internal host, internal port, lease)}
        igd.actions        # every action in order
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

__all__ = ["FakeIGD", "open_fake_igd"]

_SERVICE = "urn:schemas-upnp-org:service:WANIPConnection:1"
_ROOT = f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<specVersion><major>1</major><minor>0</minor></specVersion>
<URLBase>http://127.0.0.1:{{port}}</URLBase>
<device>
<deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<friendlyName>fake IGD</friendlyName><UDN>uuid:fake-igd</UDN>
<deviceList><device>
<deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
<serviceList><service>
<serviceType>urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1</serviceType>
<serviceId>urn:upnp-org:serviceId:WANCommonIFC1</serviceId>
<controlURL>/ctl/CmnIfCfg</controlURL><eventSubURL>/evt/CmnIfCfg</eventSubURL>
<SCPDURL>/WANCfg.xml</SCPDURL>
</service></serviceList>
<deviceList><device>
<deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
<serviceList><service>
<serviceType>{_SERVICE}</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
<controlURL>/ctl/IPConn</controlURL><eventSubURL>/evt/IPConn</eventSubURL>
<SCPDURL>/WANIPCn.xml</SCPDURL>
</service></serviceList>
</device></deviceList>
</device></deviceList>
</device>
</root>
"""


def _envelope(action: str, body: str) -> str:
    return (
        '<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/'
        'envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:{action}Response xmlns:u="{_SERVICE}">{body}</u:{action}Response>'
        "</s:Body></s:Envelope>\r\n"
    )


def _arg(body: str, name: str) -> str:
    found = re.search(rf"<{name}>([^<]*)</{name}>", body)
    return found.group(1) if found else ""


@dataclass
class FakeIGD:
    external_ip: str
    port: int = 0
    mappings: dict[tuple[int, str], tuple[str, int, int]] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/rootDesc.xml"

    def answer(self, action: str, body: str) -> str:
        self.actions.append(action)
        if action == "GetStatusInfo":
            return _envelope(
                action,
                "<NewConnectionStatus>Connected</NewConnectionStatus>"
                "<NewLastConnectionError>ERROR_NONE</NewLastConnectionError>"
                "<NewUptime>1000</NewUptime>",
            )
        if action == "GetExternalIPAddress":
            return _envelope(
                action, f"<NewExternalIPAddress>{self.external_ip}</NewExternalIPAddress>"
            )
        if action == "AddPortMapping":
            key = (int(_arg(body, "NewExternalPort")), _arg(body, "NewProtocol"))
            self.mappings[key] = (
                _arg(body, "NewInternalClient"),
                int(_arg(body, "NewInternalPort")),
                int(_arg(body, "NewLeaseDuration") or 0),
            )
        elif action == "DeletePortMapping":
            self.mappings.pop((int(_arg(body, "NewExternalPort")), _arg(body, "NewProtocol")), None)
        elif action == "GetConnectionTypeInfo":
            return _envelope(
                action,
                "<NewConnectionType>IP_Routed</NewConnectionType>"
                "<NewPossibleConnectionTypes>IP_Routed</NewPossibleConnectionTypes>",
            )
        return _envelope(action, "")

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            while length and len(body) < int(length.group(1)):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                body += chunk
            text = head.decode("latin-1")
            soap = re.search(r'(?i)soapaction:\s*"?[^#"]*#(\w+)', text)
            if soap:
                reply = self.answer(soap.group(1), body.decode("utf-8", "replace"))
            else:
                reply = _ROOT.format(port=self.port)
            payload = reply.encode()
            await stream.send_all(
                b'HTTP/1.1 200 OK\r\nContent-Type: text/xml; charset="utf-8"\r\n'
                + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )


@asynccontextmanager
async def open_fake_igd(external_ip: str = "127.0.0.1") -> AsyncIterator[FakeIGD]:
    """A fake IGD listening on 127.0.0.1 (port 0) for as long as the block runs."""
    igd = FakeIGD(external_ip)
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
        listeners = await nursery.start(serve, igd.handle, 0)
        igd.port = int(listeners[0].socket.getsockname()[1])
        try:
            yield igd
        finally:
            nursery.cancel_scope.cancel()
