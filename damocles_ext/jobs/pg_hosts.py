"""Several PostgreSQL servers before a store URL's database, as SQLAlchemy reads them (sans-IO).

SQLAlchemy reads one HOST:PORT between the user and the database: `h1,h2:5432` it passes on as
one list of hosts and one port, which libpq tries in turn; `h1:5432,h2:5433` fails on a port
that is not a number, and an [IPv6 address] in a list is read as a garbled host (then failing
as an outage). Its own form for several servers is one `host=` parameter each."""

from __future__ import annotations

import re


def several_servers_problem(url: str) -> str | None:
    """What is wrong with the servers `url` names before its database, and what to give
    instead; None when SQLAlchemy reads them (one, or several on one port)."""
    rest = url.partition("://")[2]
    *first, last = re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[2].split(",")
    if not first or ("[" not in last and not any(":" in h or "[" in h for h in first)):
        return None
    return (
        "names several servers before the database with a port each (or an [IPv6 address]),"
        " which SQLAlchemy cannot read: give each server as a host= parameter, tried in turn:"
        " postgresql://USER:PASSWORD@/DATABASE?host=h1:5432&host=h2:5433 (servers on one port:"
        " postgresql://USER:PASSWORD@h1,h2:5432/DATABASE); an IPv6 server among several by its"
        " host name"
    )
