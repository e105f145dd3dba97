"""A store URL as SQLAlchemy reads it (sans-IO): several PostgreSQL servers before its database,
and a query part it would drop.

SQLAlchemy reads one HOST:PORT between the user and the database: `h1,h2:5432` it passes on as
one list of hosts and one port, which libpq tries in turn; `h1:5432,h2:5433` fails on a port
that is not a number, and an [IPv6 address] in a list is read as a garbled host (then failing
as an outage). Its own form for several servers is one `host=` parameter each."""

from __future__ import annotations

import re


def split_userinfo(rest: str) -> tuple[str | None, str]:
    """What follows a URL's `://`, as its user info (None when it has none) and what comes
    after its `@`. A password may hold `/`, `?`, `,` or `#` unencoded (SQLAlchemy reads one up
    to its `@`), and even an `@`: the user info ends at the last `@` before the first `/` after
    the first `@`, so that all of a password is found, to be read past or hidden."""
    first = rest.find("@")
    if first < 0:
        return None, rest
    slash = rest.find("/", first)
    at = rest.rfind("@", 0, slash if slash >= 0 else len(rest))
    return rest[:at], rest[at + 1 :]


def several_servers_problem(url: str) -> str | None:
    """What is wrong with the servers `url` names before its database, and what to give
    instead; None when SQLAlchemy reads them (one, or several on one port)."""
    after = split_userinfo(url.partition("://")[2])[1]
    *first, last = re.split(r"[/?]", after, maxsplit=1)[0].split(",")
    if not first or ("[" not in last and not any(":" in h or "[" in h for h in first)):
        return None
    return (
        "names several servers before the database with a port each (or an [IPv6 address]),"
        " which SQLAlchemy cannot read: give each server as a host= parameter, tried in turn:"
        " postgresql://USER:PASSWORD@/DATABASE?host=h1:5432&host=h2:5433 (servers on one port:"
        " postgresql://USER:PASSWORD@h1,h2:5432/DATABASE); an IPv6 server among several by its"
        " host name"
    )


def bare_query_problem(url: str) -> str | None:
    """Why the query of `url` would lose a part, or None. SQLAlchemy drops a part with no `=`,
    and an empty query: `sqlite:///new?x.db` was a store at `new`, `?sslmode` no sslmode. The
    query begins at the first `?` after the user info (a password may hold one)."""
    _, question, query = split_userinfo(url.partition("://")[2])[1].partition("?")
    bare = [repr(p) for p in query.split("&") if p and "=" not in p] or ([] if query else [""])
    if not question or not bare:
        return None
    return (
        f"has {bare[0] or 'nothing'} after its ?, no NAME=VALUE parameter, which would be"
        " dropped: give each parameter a value, and write a ? in a file name as %3F"
        " (sqlite:///new%3Fx.db)"
    )
