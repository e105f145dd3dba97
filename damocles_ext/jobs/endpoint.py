"""Where a worker-prover RPC is: the address forms a damocles-worker's `rpc_client.addr` and an
operator's `--manager` take, turned into one host, port and path.

- a multiaddr, as damocles-worker's config writes it: `/ip4/1.2.3.4/tcp/1789`, `/ip6/::1/tcp/1789`,
  `/dns/host/tcp/1789` (also `/dns4/`, `/dns6/`), optionally ending in `/http`;
- a URL: `http://host:1789` (the path defaults to damocles-manager's `/rpc/v0`, also for `/`; no
  port is 80, as for any http URL);
- `host:port`, as `--listen` takes it.

Only these few multiaddr protocols mean anything for an HTTP RPC, so they are read here rather
than through the multiaddr package (which brings DNS resolution and several dependencies).
Sans-IO: a string in, an `Endpoint` or a ValueError that says what is wrong out.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import idna

DEFAULT_PATH: Final = "/rpc/v0"
DEFAULT_PORT: Final = 1789  # damocles-manager's

FORMS: Final = (
    "a multiaddr such as /ip4/1.2.3.4/tcp/1789 (also /ip6/…, /dns/…), a URL such as "
    "http://HOST:1789, or HOST:PORT"
)
_HOST_PROTOCOLS: Final = ("ip4", "ip6", "dns", "dns4", "dns6")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An HTTP JSON-RPC endpoint: connect to host:port, POST to path."""

    host: str
    port: int
    path: str = DEFAULT_PATH

    def __post_init__(self) -> None:
        # A space, a control character or a bracket is in no host name nor address: it was
        # looked up and said "cannot connect".
        if bad := next(
            (c for c in self.host if c.isspace() or not c.isprintable() or c in "[]"), None
        ):
            raise ValueError(f"{self.host!r} is not a host name (it holds {bad!r})")
        # What the resolver would refuse later with a UnicodeError (an empty label, one over
        # 63 characters; a non-ASCII name IDNA 2008 refuses, as trio encodes it with the idna
        # package), refused here as the bad address it is.
        try:
            self.ascii_host  # noqa: B018 - checked as it will be sent
        except UnicodeError as exc:
            why = "an empty label, or one over 63 characters" if self.host.isascii() else exc
            raise ValueError(f"{self.host!r} is not a host name ({why})") from None

    @property
    def ascii_host(self) -> str:
        """The host as it goes on the wire (the URL, the Host header): a non-ASCII name's
        A-labels (IDNA 2008, as trio looks it up); UnicodeError for a name that has none."""
        if self.host.isascii():
            self.host.encode("idna")  # (an empty label, one over 63 characters)
            return self.host
        return idna.encode(self.host, uts46=True).decode("ascii")

    @property
    def url(self) -> str:
        return f"http://{self._wire_host}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        return self._wire_host if self.port == 80 else f"{self._wire_host}:{self.port}"

    @property
    def _wire_host(self) -> str:  # an IPv6 address in brackets
        return f"[{self.host}]" if ":" in self.host else self.ascii_host


def _port(text: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"the port in {where!r} must be a number from 1 to 65535, not {text!r}")
    return int(text)


def _multiaddr(text: str) -> Endpoint:
    parts = text.split("/")[1:]
    if parts and parts[-1] == "":
        parts.pop()  # a trailing slash
    if parts and parts[-1] == "http":
        parts.pop()
    if len(parts) != 4 or parts[0] not in _HOST_PROTOCOLS or parts[2] != "tcp":
        if any(p in ("https", "tls", "wss", "ws") for p in parts):
            raise ValueError(f"{text!r}: only plain HTTP is spoken here (no TLS, no websocket)")
        raise ValueError(
            f"{text!r} is not a multiaddr of a TCP address; expected /ip4/HOST/tcp/PORT, "
            "/ip6/HOST/tcp/PORT or /dns/NAME/tcp/PORT"
        )
    protocol, host, _, port = parts
    if protocol in ("ip4", "ip6"):
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an {protocol} address") from None
        if address.version != int(protocol[-1]):
            raise ValueError(f"{text!r}: {host!r} is not an {protocol} address")
    elif not host:
        raise ValueError(f"{text!r}: the host name is empty")
    return Endpoint(host, _port(port, text))


def _url(text: str) -> Endpoint:
    # Lotus' ?token=… or user:password@ are never echoed (they may be a secret): the messages
    # quote the address without them.
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # "Invalid IPv6 URL" (an unclosed [), said alone before
        shown = re.sub(r"//[^/]*@", "//", text.partition("?")[0].partition("#")[0])
        raise ValueError(f"{shown!r} is not a URL ({exc})") from None
    shown = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    if parts.scheme != "http":
        raise ValueError(
            f"{shown!r}: only http:// is spoken here (no TLS); put a TLS-terminating proxy in "
            "front of the server at that address if the network needs one"
        )
    if not parts.hostname:
        raise ValueError(f"{shown!r} has no host")
    try:
        port = parts.port
    except ValueError:
        port = 0  # out of range
    if port == 0:  # urlsplit reads ":0" as 0, and no port as None
        raise ValueError(f"the port in {shown!r} must be a number from 1 to 65535")
    # A bare "/" (http://HOST:PORT/, as a browser writes it) is no RPC path: the default.
    path = parts.path if parts.path not in ("", "/") else DEFAULT_PATH
    if parts.query or "@" in parts.netloc:
        what = "a query (?…)" if parts.query else "credentials (…@)"
        address = Endpoint(parts.hostname, port or 80, path).url
        raise ValueError(
            f"the address {address} is given with {what}, which is not sent; give the token in"
            " an 'Authorization: Bearer TOKEN' header (--header, --proxy-header) or with"
            " --token-file, and the address without it"
        )
    return Endpoint(parts.hostname, 80 if port is None else port, path)


def parse_endpoint(text: str, forms: str = FORMS) -> Endpoint:
    """The endpoint `text` names; raises ValueError naming the text and, where it is no address
    at all, the forms it may take (`forms`: an option's own way of saying them)."""
    text = text.strip()
    if not text:
        raise ValueError(f"the RPC address is empty; give {forms}")
    if text.startswith("/"):
        return _multiaddr(text)
    if "://" in text:
        return _url(text)
    host, sep, port = text.rpartition(":")
    if host.startswith("[") != host.endswith("]"):  # `[::1:1` was read as [::1]:1
        raise ValueError(f"{text!r}: an IPv6 address is written in [ and ], as [::1]:1789")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host:
        raise ValueError(f"{text!r} is not an RPC address; give {forms}")
    return Endpoint(host, _port(port, text))


def damocles_worker_address(text: str) -> str:
    """A damocles-worker.toml's `rpc_client.addr` as damocles-worker dials it: a URL's path is
    always `/rpc/v0` there, whatever the URL's own (its `rpc_addr`, src/util/net.rs), so
    `http://HOST:1789/` reaches the RPC; a multiaddr is kept as written. ValueError as
    `parse_endpoint` raises it."""
    endpoint = parse_endpoint(text)
    if text.strip().startswith("/"):
        return text
    return Endpoint(endpoint.host, endpoint.port).url


#: An HTTP header name (RFC 9110's token): ASCII letters, digits and a few marks, no spaces.
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


#: Headers the RPC client sets itself (the request's framing and connection): one given again
#: would contradict it, and h11 refuses to send the request (each call would fail).
CLIENT_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
    }
)


def header_name_problem(name: str) -> str | None:
    """Why a header named `name` cannot be given to send (the client sets it), or None."""
    if name.lower() in CLIENT_HEADERS:
        return (
            f"{name} is a header the HTTP client sets itself (from the address and the request);"
            " leave it out"
        )
    return None


def header_value_problem(value: str) -> str | None:
    """Why `value` cannot be sent as an HTTP header's value (or token), or None."""
    if any(c in value for c in "\r\n"):
        return "a header value cannot hold a line break"
    if not value.isascii() or any(c != "\t" and (c < " " or c == "\x7f") for c in value):
        return "a header value is sent as ASCII: no other characters, and no control characters"
    return None
