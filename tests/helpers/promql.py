"""The metrics a live `run`, `coordinator`, `worker` and sector locator register, and a reader of
the PromQL queries written against them (the Grafana dashboard's, the documents' examples)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from damocles_ext.api import open_supervisor
from damocles_ext.frontends.worker import Worker
from damocles_ext.frontends.worker_control import WorkerMetrics
from damocles_ext.jobs.metrics import JobMetrics
from damocles_ext.jobs.pings import PausedWorkers
from damocles_ext.jobs.store import JobStore
from damocles_ext.jobs.worker_settings import WorkerSettings
from damocles_ext.metrics import SupervisorMetrics
from damocles_ext.plugins import get_plugin_manager
from damocles_ext.sectors.metrics import SectorMetrics
from helpers.supervisor import builtin_child, spec

# PromQL's words that are not metric names (functions are told apart by their "(").
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset", "inf", "nan"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings (label values)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana's variables
    expr = re.sub(r"\boffset\s+-?\w+", "", expr)
    expr = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:e[+-]?\d+)?[A-Za-z]*", "", expr)  # numbers, 5m
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[m.end() :].lstrip().startswith("(") or m.group().lower() in PROMQL_WORDS:
            continue
        names.add(m.group())
    return names


def series_names(families) -> set[str]:
    """Every series name a registry's families give PromQL (a counter's _total, a histogram's
    _bucket, _sum and _count), whether or not they have samples yet."""
    names = set()
    for family in families:
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


@dataclass
class Exported:
    """One metric as Prometheus sees it: its type, its labels and the values each label took."""

    type: str
    labels: set[str] = field(default_factory=set)
    values: dict[str, set[str]] = field(default_factory=dict)


def exported(families) -> dict[str, Exported]:
    """{the name a table or a query gives it (a counter's with _total): Exported}; a
    histogram's `le` is not one of its labels."""
    out: dict[str, Exported] = {}
    for family in families:
        name = f"{family.name}_total" if family.type == "counter" else family.name
        e = out.setdefault(name, Exported(family.type))
        e.labels |= set(getattr(family, "_labelnames", ()))  # a family with no sample yet
        for s in family.samples:
            for label, value in s.labels.items():
                if label != "le":
                    e.labels.add(label)
                    e.values.setdefault(label, set()).add(value)
    return out


async def live_families(tmp_path: Path) -> list:
    """The families a `run` with one WindowPoSt child, a `coordinator` on an SQLite store, a
    `worker` and a sector locator with one provider register, as their commands wire them."""
    metrics = SupervisorMetrics()
    pm = get_plugin_manager(entry_points=False)
    pm.register(metrics, name="damocles_ext.metrics")
    async with open_supervisor(
        [spec(builtin_child("window_post", "echo"))], plugin_manager=pm
    ) as sup:
        metrics.attach(sup, trio.lowlevel.current_trio_token())
        await sup.wait_ready()
        # Collected where Prometheus' HTTP thread would: off the trio thread.
        families = await trio.to_thread.run_sync(lambda: list(metrics.registry.collect()))
    store = JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        # As the coordinator command makes them: with the workers its pings say are paused.
        families += list(JobMetrics(store, paused_workers=PausedWorkers()).registry.collect())
    finally:
        store.close()
    # The worker's metrics, as `worker --metrics` registers them beside its supervisor's.
    worker = Worker(WorkerSettings("127.0.0.1:1", (spec(builtin_child("window_post", "echo")),)))
    families += list(WorkerMetrics(worker, CollectorRegistry()).registry.collect())
    sectors = SectorMetrics()
    sectors.source_errors.labels(provider="source-node")  # as the locator makes each provider's
    families += list(sectors.registry.collect())
    return families


#: Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"instance", "job"}
#: Labels whose values come from the config or the deployment, not from a fixed set.
FREE_LABELS = {"stage", "child", "provider"} | TARGET_LABELS
RANGE_FUNCTIONS = ("rate", "irate", "increase")


def _base(name: str, metrics: dict[str, Exported]) -> tuple[str, Exported] | None:
    """The exported metric a series name belongs to (a histogram's _bucket, _count, _sum)."""
    if name in metrics:
        return name, metrics[name]
    for suffix in ("_bucket", "_count", "_sum"):
        stem = name.removesuffix(suffix)
        if stem != name and stem in metrics and metrics[stem].type == "histogram":
            return stem, metrics[stem]
    return None


def query_problems(expr: str, families) -> list[str]:
    """What is wrong in a PromQL query against the metrics `families` export: a metric that does
    not exist, a label it does not carry (in a matcher or a `by`), a value a label never takes
    (of a label with a fixed set of values), rate()/increase() of a gauge."""
    metrics = exported(families)
    problems = []
    names = metric_names(expr)
    labels: set[str] = set(TARGET_LABELS)
    for name in sorted(names):
        found = _base(name, metrics)
        if found is None:
            problems.append(f"{name}: no such metric")
            continue
        labels |= found[1].labels | ({"le"} if name.endswith("_bucket") else set())
    plain = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana's variables
    for m in re.finditer(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", plain):
        found = _base(m.group(1), metrics)
        if found is None:
            continue
        stem, e = found
        own = e.labels | TARGET_LABELS | ({"le"} if m.group(1).endswith("_bucket") else set())
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', m.group(2)):
            if label not in own:
                problems.append(f"{m.group(1)} has no label {label!r} (it has {sorted(own)})")
            elif label not in FREE_LABELS and label in e.values and value:
                taken = e.values[label]
                alternatives = value.split("|") if "~" in op else [value]
                for v in alternatives:
                    if v not in taken:
                        problems.append(f"{stem}{{{label}}} is never {v!r} (only {sorted(taken)})")
    for m in re.finditer(rf"\b({'|'.join(RANGE_FUNCTIONS)})\s*\(\s*([A-Za-z_:][\w:]*)", plain):
        found = _base(m.group(2), metrics)
        if found is not None and found[1].type not in ("counter", "histogram"):
            problems.append(f"{m.group(1)}() of {m.group(2)}, a {found[1].type}")
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", plain):
        for label in (x.strip() for x in group.split(",")):
            if label and label not in labels:
                problems.append(f"by ({label}): no metric of the query has that label")
    return problems
