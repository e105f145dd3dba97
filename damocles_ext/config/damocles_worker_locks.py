"""damocles-worker's ext locks made ours: `[processors.ext_locks]` and each processor's `locks`
turned into the locks and `concurrent` of the children that `damocles-ext worker` runs for a
damocles-worker.toml (damocles_worker.py reads the rest).

Sans-IO: ChildSpecs in, ChildSpecs and messages out.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from .messages import _show
from .spec import ChildSpec, device_locks


class Processor(NamedTuple):
    """A [[processors.window_post]] read: its child, the file's ext locks it names, and whether
    the file gives its concurrent (else one per wdpost thread)."""

    spec: ChildSpec
    named_locks: tuple[str, ...]
    concurrent_given: bool


def shared_locks(
    source: str,
    processors: list[Processor],
    ext_locks: dict[str, int],
    bound: int,
    warnings: list[str],
    errors: list[str],
) -> list[ChildSpec]:
    """damocles-worker's ext locks made ours. Its lock of N holders lets N proofs at a time
    hold it, whatever processors run them; ours has one holder, a child, which runs up to
    its `concurrent` proofs under it. The same limits, where they can be: a lock named by
    one processor caps its concurrent at N; a lock of 1 holds its processors to one proof
    at a time (each child's concurrent 1: one child at a time under the lock, one proof in
    it); a lock of at least as many holders as its processors run proofs at once (at most
    `bound`, the worker's jobs at once) never makes one wait (dropped); one in between
    needs a lock shared by counts, which ours is not (an error that says what to give).
    The locks our children take per device (`gpu:<i>`) are not the file's and stay."""
    children = [p.spec for p in processors]
    by_lock: dict[str, list[int]] = {}
    for k, processor in enumerate(processors):
        for lock in processor.named_locks:
            by_lock.setdefault(lock, []).append(k)
    for lock, holders in by_lock.items():
        count = ext_locks[lock]
        if count >= 1 and (count == 1 or len(holders) == 1):
            for k in holders:
                child, concurrent = children[k], min(children[k].concurrent, count)
                if concurrent < child.concurrent and processors[k].concurrent_given:
                    warnings.append(
                        f"{source}: {processor_name(child)}: concurrent {child.concurrent}"
                        f" runs as {concurrent}: [processors.ext_locks] {_show(lock)} ="
                        f" {count} lets {count} proof(s) at a time run under it, as in"
                        " damocles-worker"
                    )
                children[k] = msgspec.structs.replace(child, concurrent=concurrent)
    for lock, holders in by_lock.items():
        count, runs = ext_locks[lock], [children[k] for k in holders]
        at_once = min(sum(c.concurrent for c in runs), bound)
        if count == 0:
            errors.append(
                f"[processors.ext_locks] {_show(lock)} = 0: the processors that name it"
                f" ({', '.join(processor_name(c) for c in runs)}) would never run a proof;"
                " give it 1 or more"
            )
        elif 1 < count < at_once and len(holders) > 1:
            given = [processors[k].concurrent_given for k in holders]
            each = ", ".join(
                f"{processor_name(c)} {c.concurrent}{'' if g else ' (unset: one per thread)'}"
                for c, g in zip(runs, given, strict=True)
            )
            errors.append(
                f"[processors.ext_locks] {_show(lock)} = {count}, and the processors that"
                f" name it run up to {at_once} proofs at once ({each}): damocles-ext's"
                " locks have one holder, a child, so it cannot share this one by counts;"
                f" give it 1 (one proof at a time) or at least {at_once} (no wait), or"
                " lower their concurrent, or declare one lock per GPU (gpu0 = 1, gpu1 = 1)"
            )
        elif count > 1 and count >= at_once and len(holders) > 1:  # never makes one wait
            for k in holders:
                child = children[k]
                if lock not in device_locks(child.gpu):  # (a device's own lock is kept)
                    kept = tuple(x for x in child.locks if x != lock)
                    children[k] = msgspec.structs.replace(child, locks=kept)
    return children


def processor_name(child: ChildSpec) -> str:
    return f"processors.window_post[{child.index}]"
