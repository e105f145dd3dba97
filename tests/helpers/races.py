"""A file changed between a look at it and its open: what a reader that looks first would miss."""

from __future__ import annotations

import os

import pytest


def deleted_as_it_is_opened(monkeypatch: pytest.MonkeyPatch, path: os.PathLike[str]) -> list[str]:
    """`path` deleted just before its first os.open: a file removed between a look at it and its
    open. Returns what was deleted: empty if it never was opened, and the test proved nothing."""
    real, deleted = os.open, []

    def delete_then_open(name, flags, *args, **kwargs):
        if os.fspath(name) == os.fspath(path) and not deleted:
            deleted.append(os.fspath(name))
            os.unlink(path)
        return real(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", delete_then_open)
    return deleted
