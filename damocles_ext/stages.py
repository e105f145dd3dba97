"""The PoSt stages, and which children can serve a stage's requests: the one home of both rules.

Sans-IO and free of heavy imports (no msgspec, no trio), so that the CLI's argument parsers can
name the stages without slowing `serve`'s start, which damocles-manager times.

A WindowPoSt runs whole on a [[WdPost]] child, or split in two steps (damocles-ext's own): a
vanilla step on a [[WdPostVanilla]] child, then a SNARK step on a [[WdPostSnark]] child. A
config has one or the other (config.py refuses both, and one split table without the other).
"""

from __future__ import annotations

from collections.abc import Iterable

#: The stages damocles-manager sends (its JSON lines carry only these).
POST_STAGES = ("window_post", "winning_post")
#: The steps a split WindowPoSt runs, in order.
WINDOW_POST_SPLIT = ("window_post_vanilla", "window_post_snark")
#: Every stage a child can serve.
STAGES = POST_STAGES + WINDOW_POST_SPLIT


def post_stage(stage: str) -> str:
    """The stage damocles sends that requests of `stage` are part of: a split step's is
    window_post."""
    return "window_post" if stage in WINDOW_POST_SPLIT else stage


def child_stages(stage: str) -> frozenset[str]:
    """The children's stages that may take part in serving requests of `stage`."""
    if stage == "window_post":
        return frozenset((stage, *WINDOW_POST_SPLIT))
    return frozenset((stage,))


def runs_split(served: Iterable[str]) -> bool:
    """True when children of the stages `served` prove a WindowPoSt in two steps."""
    served = set(served)
    return "window_post" not in served and served.issuperset(WINDOW_POST_SPLIT)


def can_serve(stage: str, served: Iterable[str]) -> bool:
    """True when children of the stages `served` can answer requests of `stage`."""
    served = set(served)
    return stage in served or (stage == "window_post" and runs_split(served))
