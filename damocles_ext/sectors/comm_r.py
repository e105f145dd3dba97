"""A WindowPoSt from sector numbers (`prove window_post --sectors MINER:NUMBER,… --comm-r FILE`):
the sector list and the on-chain `comm_r` file, read without any chain access.

- `parse_numbers("10-20")`: a sector number or a range of them, as `sectors find` and
  `prove --sectors` take them (one parser, the same checks and words for both).
- `parse_sector_list("1000:5,1000:6:upgrade,1000:10-20")`: `SectorRef`s; `f0`/`t0` before the
  miner is allowed, `:upgrade` marks a SnapDeals-upgraded sector (its files in `update/`,
  `update-cache/`), a number may be a range `FIRST-LAST`; items are separated by commas or line
  breaks (the text of `--sectors @LIST`).
- `parse_comm_r_file(data, name)`: the file is a JSON object `{"MINER:NUMBER": COMM_R, …}`, each
  `COMM_R` the sector's sealed commitment as the chain has it: a CID string (`bagboea4b5abc…`,
  as Lotus' `StateSectorGetInfo` prints `SealedCID`), `{"/": CID}` (its JSON form), or 64 hex
  digits (the raw 32 bytes, as `sectors create`'s manifest writes them). The key's miner may be
  written `f0…`/`t0…`. A bad entry is a `CommRFileError` naming the file and the entry.

Sans-IO: bytes in, values out.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from .model import SectorRef

# ASCII digits only: \d takes fullwidth or Arabic-Indic digits too.
_REF = re.compile(r"(?:[ft]0)?([0-9]+):([0-9]+)(:upgrade)?")
_REFS = re.compile(r"(?:[ft]0)?([0-9]+):([0-9]+(?:-[0-9]+)?)(:upgrade)?")
_NUMBERS = re.compile(r"([0-9]+)(?:-([0-9]+))?")
#: Sectors one command may ask for (`sectors find`), or one `prove --sectors` prove; a range
#: over it is refused before anything is built (a deadline has at most a few tens of thousands).
MAX_SECTORS = 1_000_000
#: The multicodec of a sealed commitment (fil-commitment-sealed) and its multihash
#: (poseidon-bls12_381-a2-fc1, 0xb401), as go-fil-commcid writes them.
SEALED_CODEC = 0xF102
SEALED_HASH = 0xB401


class CommRFileError(ValueError):
    """The comm_r file, or one of its entries, cannot be read; the message names both."""


def parse_ref(text: str) -> SectorRef:
    """`MINER:NUMBER[:upgrade]` -> SectorRef; ValueError saying the form."""
    m = _REF.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text.strip()!r} is not MINER:NUMBER (e.g. 1000:5, f01000:5:upgrade)")
    # Past 20 digits it is past 2^64-1 (and int() refuses thousands of digits with its own words).
    if any(len(m.group(i).lstrip("0")) > 20 for i in (1, 2)):
        raise ValueError(f"{text.strip()[:60]!r}: a miner and a sector number are below 2^64")
    return SectorRef(int(m.group(1)), int(m.group(2)), m.group(3) is not None)


def parse_numbers(text: str, item: str | None = None) -> range:
    """`NUMBER`, or `FIRST-LAST` (every number from FIRST to LAST), at most MAX_SECTORS of them;
    ValueError naming `item` (by default `text`, the number as given) and saying what to give."""
    name = text if item is None else item
    m = _NUMBERS.fullmatch(text.strip())
    if m is None:
        raise ValueError(
            f"{name[:60]!r} is not a sector number; give a whole number (12) or a range (10-20)"
        )
    # Past 20 digits it is past 2^64-1 (and int() refuses thousands of digits with its own words).
    if any(len((d or "").lstrip("0")) > 20 for d in m.groups()):
        raise ValueError(f"{name[:60]!r}: a sector number is below 2^64")
    first = int(m.group(1))
    last = first if m.group(2) is None else int(m.group(2))
    if last < first:
        raise ValueError(f"{name!r}: the range ends before it starts")
    if last >= 2**64:
        raise ValueError(f"{name!r}: a sector number is below 2^64")
    if last - first >= MAX_SECTORS:
        raise ValueError(f"{name!r}: over {MAX_SECTORS} sectors")
    return range(first, last + 1)


def _parse_item(text: str) -> tuple[int, range, bool]:
    """`MINER:NUMBER[:upgrade]`, NUMBER also `FIRST-LAST` -> (miner, numbers, upgrade)."""
    item = text.strip()
    m = _REFS.fullmatch(item)
    if m is None:
        raise ValueError(
            f"{item[:60]!r} is not MINER:NUMBER or MINER:FIRST-LAST (e.g. 1000:5, 1000:0-2348,"
            " f01000:5:upgrade)"
        )
    if len(m.group(1).lstrip("0")) > 20 or int(m.group(1)) >= 2**64:
        raise ValueError(f"{item[:60]!r}: a miner is below 2^64")
    return int(m.group(1)), parse_numbers(m.group(2), item), m.group(3) is not None


def parse_sector_list(text: str) -> list[SectorRef]:
    """`MINER:NUMBER[:upgrade]` items separated by commas or line breaks, a NUMBER also a range
    `FIRST-LAST`, at most MAX_SECTORS in all; ValueError naming the bad one."""
    items = [_parse_item(part) for part in re.split(r"[,\n]", text) if part.strip()]
    if not items:
        raise ValueError("no sector given; write MINER:NUMBER,MINER:FIRST-LAST,…")
    total = sum(len(numbers) for _, numbers, _ in items)
    if total > MAX_SECTORS:  # before a million refs are built
        raise ValueError(
            f"{total} sectors asked for; at most {MAX_SECTORS} at once: prove them in several tasks"
        )
    refs = [SectorRef(miner, n, upgrade) for miner, numbers, upgrade in items for n in numbers]
    seen: set[tuple[int, int]] = set()
    for ref in refs:  # a task proves a sector once: the prover refuses one given twice
        if (ref.miner, ref.number) in seen:
            raise ValueError(
                f"{ref.miner}:{ref.number} is given twice (a sector is proved once, upgraded or"
                " not); keep one"
            )
        seen.add((ref.miner, ref.number))
    return refs


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("a CID ends inside a number")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def comm_r_from_cid(cid: str) -> bytes:
    """The 32 bytes of a sealed-commitment CID (`bagboea4b5abc…`); ValueError saying why not."""
    if not cid.startswith("b"):
        raise ValueError("a CID of a sealed commitment is base32, starting with 'b'")
    body = cid[1:].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError:
        raise ValueError("not base32") from None
    version, at = _varint(raw, 0)
    codec, at = _varint(raw, at)
    hash_code, at = _varint(raw, at)
    size, at = _varint(raw, at)
    if version != 1 or codec != SEALED_CODEC:
        raise ValueError(
            f"not a sealed commitment's CID (version {version}, codec {codec:#x}; a SealedCID is"
            f" version 1, codec {SEALED_CODEC:#x})"
        )
    if hash_code != SEALED_HASH or size != 32 or len(raw) - at != 32:
        raise ValueError("its hash is not a 32-byte poseidon commitment")
    return raw[at:]


def comm_r_value(value: Any) -> bytes:
    """A comm_r as the file gives it -> 32 bytes; ValueError saying the forms taken."""
    if isinstance(value, dict) and set(value) == {"/"}:
        value = value["/"]
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 - a bad entry of a file: one error type for the caller
            f"{value!r} is not a comm_r: give a CID string, {{'/': CID}} or 64 hex digits"
        )
    text = value.strip().removeprefix("0x")
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    if text.startswith("b"):
        return comm_r_from_cid(text)
    raise ValueError(f"{value!r} is not a comm_r: give a CID (bagboea…) or 64 hex digits")


def parse_comm_r_file(data: bytes, name: str) -> dict[SectorRef, bytes]:
    """`{"MINER:NUMBER": COMM_R}` -> {SectorRef (normal index): 32 bytes}; CommRFileError naming
    the file and the entry."""
    import json

    try:
        decoded = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CommRFileError(f"{name}: not JSON: {exc}") from None
    if not isinstance(decoded, dict):
        raise CommRFileError(
            f'{name}: expected a JSON object {{"MINER:NUMBER": "COMM_R", …}}, got a'
            f" {type(decoded).__name__}"
        )
    found: dict[SectorRef, bytes] = {}
    for key, value in decoded.items():
        try:
            ref = parse_ref(key)
            if ref.upgrade:
                raise ValueError("the comm_r file names sectors without :upgrade")
            if ref in found:
                raise ValueError("given twice")
            found[ref] = comm_r_value(value)
        except ValueError as exc:
            raise CommRFileError(f"{name}: entry {key!r}: {exc}") from None
    return found
