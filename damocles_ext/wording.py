"""Wording shared by messages of several layers. Sans-IO: strings in, a string out."""

from __future__ import annotations

from collections.abc import Sequence


def some_and_more(shown: Sequence[str], total: int, sep: str = ", ") -> str:
    """`shown`, the first few of `total` things, joined by `sep`, then how many more there are:
    'a, b, c and 4 more'. Joined by '; ' (things that hold commas themselves) it is 'a; b; c;
    and 4 more', so that the count is not read as part of the last one."""
    text = sep.join(shown)
    if total <= len(shown):
        return text
    return f"{text}{';' if sep == '; ' else ''} and {total - len(shown)} more"


#: Sector numbers one line names at most (what it is about holds them all): a partition's
#: 2,349 faulty sectors made a 13 KB line, its advice at its end.
SECTORS_NAMED = 20


def sector_list(numbers: Sequence[int]) -> str:
    """The first SECTORS_NAMED of `numbers`, then how many more: '3, 9, 12 and 4 more'."""
    return some_and_more([str(n) for n in numbers[:SECTORS_NAMED]], len(numbers))
