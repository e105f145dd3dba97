"""damocles-worker.toml, read as is: what `damocles-ext worker` needs from the config file an
operator already runs damocles-worker's WindowPoSt threads with.

Read from it, with damocles-worker's own key names, defaults and merge rules (`src/config.rs`,
`sealing/config.rs`, `sealing/processor/external/`):

- `[worker] name` (unset: the worker names itself by the address it reaches the manager from);
- `[sector_manager] rpc_client.addr` and `rpc_client.headers` (an `Authorization = "Bearer …"`
  header becomes the token);
- every `[[sealing_thread]]` whose plan is "wdpost" (also when its `<location>/config.toml` says
  so, as damocles reads it at start): `sealing.allowed_miners`, `sealing.allowed_sizes`,
  `sealing.recover_interval`, each taken from the thread, else from `[sealing]`, else
  damocles-worker's default; threads of other plans are counted, not read; a thread whose
  location (canonicalised) an earlier thread has is skipped, as damocles-worker skips it;
- `[[attached]] name, location` (name defaults to the location's absolute path) and the stores
  `[worker] scan_persist_stores` finds;
- `[processors.limitation.concurrent] window_post` (or the older `[processors.limit]`);
- `[[processors.window_post]]` as children: `bin` (unset: damocles-worker), `args` (unset:
  `processor window_post`, with a `bin` too), `envs`, `cgroup.cpuset` (passed as
  damocles-worker passes it, env VC_CG_NAME/VC_CG_CPUSET, and pinned by our supervisor too),
  `numa_preferred`, `concurrent`, `stable_wait`, `locks`, `auto_restart`, `inherit_envs`.

Every other key is reported in a warning naming its table; a bad value is a ConfigError (exit 2)
naming the file, the key and what to write.
"""

from __future__ import annotations

import errno
import glob
import json
import os
from collections.abc import Mapping
from typing import Any

import msgspec

from ..jobs.endpoint import damocles_worker_address
from ..tasks import SECTOR_SIZES, proof_types_for_sizes
from . import machine
from .damocles_worker_keys import (
    ATTACHED,
    PROCESSOR,
    SCHEMA,
    THREAD,
    sector_size,
    unread_key_warnings,
    unread_keys,
)
from .damocles_worker_locks import Processor, shared_locks
from .damocles_worker_values import TypedTable
from .keys import _parse_cpuset
from .load import parse_toml, read_config_text
from .messages import _show, _suggest
from .spec import (
    DAMOCLES_WORKER,
    DEFAULT_CANCEL_GRACE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_WEIGHT,
    MAX_CONCURRENT,
    MAX_SECONDS,
    TMP_ROOT_ENV,
    ChildSpec,
    Config,
    ConfigError,
    NotRegularConfig,
    device_locks,
)

PLAN_WDPOST = "wdpost"
DEFAULT_PLAN = "sealer"  # a thread without `plan`
SEALING_PLANS = ("sealer", "snapup", "rebuild", "unseal")  # damocles-worker's other planners
DEFAULT_RECOVER_INTERVAL = 60.0  # damocles-worker's; its docs advise 15s for wdpost threads
DEFAULT_STABLE_WAIT = 5.0
STAGE = "window_post"
# vc-processors' names for what a child applies to itself.
ENV_CGROUP_NAME = "VC_CG_NAME"
ENV_CGROUP_CPUSET = "VC_CG_CPUSET"
ENV_NUMA_PREFERRED = "VENUS_WORKER_NUMA_PREFERRED"
DEFAULT_CGROUP_GROUP = "vc-worker"
HOT_CONFIG_NAME = "config.toml"  # a sealing thread's own overrides, in its location
SECTORSTORE_JSON = "sectorstore.json"  # what scan_persist_stores looks for
MAX_NUMA_NODE = 1023
# numa_preferred is a C int; a negative one is libnuma's "no preferred node" (local allocation).
MIN_NUMA_PREFERRED = -(2**31)


class AttachedStore(msgspec.Struct, frozen=True):
    """A persistent store the worker reads sectors from: the name jobs give, the directory."""

    name: str
    location: str
    readonly: bool = False


class WdPostThread(msgspec.Struct, frozen=True):
    """One `[[sealing_thread]]` of plan "wdpost": the jobs it may take. Empty lists allow any."""

    index: int  # its place among the file's [[sealing_thread]] tables
    allowed_miners: tuple[int, ...]
    allowed_sizes: tuple[str, ...]  # as our tasks spell them: "32GiB"
    recover_interval: float  # seconds to wait after the manager had no job or an error

    @property
    def allowed_proof_types(self) -> tuple[str, ...]:
        """What damocles-worker asks the manager for: allowed_sizes as proof type names."""
        return proof_types_for_sizes(self.allowed_sizes)


class DamoclesWorkerConfig(msgspec.Struct, frozen=True):
    """What `damocles-ext worker` takes from a damocles-worker.toml."""

    source: str
    manager: str  # rpc_client.addr: a multiaddr as written, a URL as damocles-worker dials it
    headers: dict[str, str]  # sent with every RPC; Authorization moved to `token` if Bearer
    token: str | None
    name: str | None  # None: the address of the interface that reaches the manager
    threads: tuple[WdPostThread, ...]
    other_threads: dict[str, int]  # plan -> how many threads of it (not ours)
    attached: tuple[AttachedStore, ...]
    window_post_limit: int | None  # [processors.limitation.concurrent] window_post
    children: tuple[ChildSpec, ...]
    tmp_root: str
    warnings: tuple[str, ...]

    def __repr__(self) -> str:  # never print the token or an Authorization header in a log
        headers = {
            k: ("***" if k.lower() == "authorization" else v) for k, v in self.headers.items()
        }
        token = None if self.token is None else "***"
        return (
            f"DamoclesWorkerConfig(source={self.source!r}, manager={self.manager!r}, "
            f"headers={headers!r}, token={token!r}, name={self.name!r}, "
            f"threads={self.threads!r}, other_threads={self.other_threads!r}, "
            f"attached={self.attached!r}, window_post_limit={self.window_post_limit!r}, "
            f"children={len(self.children)})"
        )

    @property
    def allowed_miners(self) -> tuple[int, ...]:
        """The miners any wdpost thread takes, () for any: one worker pulls for all threads."""
        if any(not t.allowed_miners for t in self.threads):
            return ()
        return tuple(sorted({m for t in self.threads for m in t.allowed_miners}))

    @property
    def allowed_sizes(self) -> tuple[str, ...]:
        """The sector sizes any wdpost thread takes, () for any."""
        if any(not t.allowed_sizes for t in self.threads):
            return ()
        sizes = {s for t in self.threads for s in t.allowed_sizes}
        return tuple(sorted(sizes, key=SECTOR_SIZES.index))

    @property
    def allowed_proof_types(self) -> tuple[str, ...]:
        """allowed_sizes as the proof type names the manager filters on, () for any."""
        return proof_types_for_sizes(self.allowed_sizes)

    @property
    def idle_poll(self) -> float:
        """Seconds to wait when the manager had no job: the shortest thread's recover_interval."""
        return min(t.recover_interval for t in self.threads)

    @property
    def max_jobs(self) -> int:
        """How many jobs damocles-worker would run at once: one per wdpost thread, at most the
        window_post limit."""
        limit = self.window_post_limit
        return len(self.threads) if limit is None else min(limit, len(self.threads))

    def to_config(self) -> Config:
        """The children as a parsed ext-prover.cfg, for the code that starts a supervisor."""
        return Config(
            source=self.source,
            children=list(self.children),
            warnings=list(self.warnings),
            scoped_warnings=[(None, w) for w in self.warnings],
            tmp_root=self.tmp_root,
            dialect="damocles-worker.toml",
        )


def load_damocles_worker_config(path: str | os.PathLike[str]) -> DamoclesWorkerConfig:
    """Read a damocles-worker.toml; ConfigError (exit 2) lists every problem in it."""
    source = os.fspath(path)
    return parse_damocles_worker_config(read_config_text(source, "damocles-worker.toml"), source)


def parse_damocles_worker_config(
    text: str, source: str, *, pid: int | None = None, tmp_root: str | None = None
) -> DamoclesWorkerConfig:
    """damocles-worker.toml text -> DamoclesWorkerConfig; `source` names it in messages, `pid`
    goes into each child's VC_CG_NAME as damocles-worker puts its own."""
    doc = parse_toml(text, source)
    reader = _Reader(source, os.getpid() if pid is None else pid)
    return reader.read(doc, tmp_root)


def _miscased(doc: Mapping[str, Any], name: str, form: str) -> str:
    """A note for the error that `name` is missing when the file has it in another case (damocles'
    docs write [[Attached]]): damocles-worker's keys are case-sensitive, and it ignores that."""
    others = [key for key in doc if key.lower() == name and key != name]
    if not others:
        return ""
    return (
        f" (the file's {form.format(others[0])} is not read: key names are lower-case, and"
        f" damocles-worker ignores {form.format(others[0])} too; write {form.format(name)})"
    )


class _Reader:
    def __init__(self, source: str, pid: int) -> None:
        self.source = source
        self.pid = pid
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.unread: list[tuple[str, str, str]] = []

    def table(self, parent: Mapping[str, Any], key: str, where: str) -> TypedTable:
        return TypedTable.of(parent, key, where, self.errors)

    def read(self, doc: dict[str, Any], tmp_root: str | None) -> DamoclesWorkerConfig:
        self.unread += unread_keys(doc, SCHEMA, "")
        top = TypedTable(doc, "", self.errors)
        worker = self.table(doc, "worker", "worker")
        name = worker.string("name", nonempty=True)
        manager, headers, token = self._manager(doc)
        threads, others = self._threads(doc, top)
        attached = self._attached(top, worker)
        processors = self.table(doc, "processors", "processors")
        limit = self._window_post_limit(processors)
        children = self._children(processors, limit, len(threads))
        if tmp_root is None:
            tmp_root = os.environ.get(TMP_ROOT_ENV) or machine.default_tmp_root()
        if self.errors:  # [sealing] is read once per thread: say each of its mistakes once
            raise ConfigError(self.source, list(dict.fromkeys(self.errors)))
        if others:
            listed = ", ".join(f'{n} of plan "{plan}"' for plan, n in others.items())
            self.warnings.append(
                f"{self.source}: [[sealing_thread]]: {listed}: sealing work, not ours (skipped)"
            )
        self.warnings[:0] = unread_key_warnings(self.source, self.unread)
        return DamoclesWorkerConfig(
            source=self.source,
            manager=manager,
            headers=headers,
            token=token,
            name=name,
            threads=tuple(threads),
            other_threads=others,
            attached=tuple(attached),
            window_post_limit=limit,
            children=tuple(children),
            tmp_root=tmp_root,
            warnings=tuple(self.warnings),
        )

    def _manager(self, doc: dict[str, Any]) -> tuple[str, dict[str, str], str | None]:
        where = "sector_manager.rpc_client"
        if "sector_manager" not in doc:
            self.errors.append(
                "no [sector_manager] table: the worker needs the manager's address; add "
                '[sector_manager] with rpc_client.addr = "/ip4/HOST/tcp/1789"'
                + _miscased(doc, "sector_manager", "[{}]")
            )
            return "", {}, None
        client = TypedTable.of(
            self.table(doc, "sector_manager", "sector_manager").raw,
            "rpc_client",
            where,
            self.errors,
        )
        addr = client.string("addr", nonempty=True)
        if addr is None and "addr" not in client.raw:
            self.errors.append(
                f'{where}.addr: missing; write the manager\'s address, e.g. "/ip4/HOST/tcp/1789"'
            )
        elif addr is not None:
            try:
                addr = damocles_worker_address(addr)
            except ValueError as exc:
                self.errors.append(f"{where}.addr: {exc}")
        headers = client.headers("headers")
        token = None
        for key in list(headers):
            scheme, _, credentials = headers[key].partition(" ")
            if key.lower() == "authorization" and scheme.lower() == "bearer" and credentials:
                token = credentials.strip()
                del headers[key]
        return addr or "", headers, token

    def _threads(
        self, doc: dict[str, Any], top: TypedTable
    ) -> tuple[list[WdPostThread], dict[str, int]]:
        common = self.table(doc, "sealing", "sealing")
        threads: list[WdPostThread] = []
        others: dict[str, int] = {}
        loaded: dict[str, str] = {}  # canonical location -> the thread that has it
        skipped: list[str] = []
        for i, raw in top.tables("sealing_thread"):
            where = f"sealing_thread[{i}]"
            if (again := self._location_loaded(raw, where, loaded)) is not None:
                skipped.append(again)
                continue
            layers = [common, TypedTable.of(raw, "sealing", f"{where}.sealing", self.errors)]
            plan = TypedTable(raw, where, self.errors).string("plan", nonempty=True)
            hot = self._hot_config(raw, where)
            if hot is not None:
                plan = hot.string("plan", nonempty=True) or plan
                layers.append(
                    TypedTable.of(hot.raw, "sealing", f"{hot.where}.sealing", self.errors)
                )
            plan = plan or DEFAULT_PLAN
            if plan != PLAN_WDPOST:
                others[plan] = others.get(plan, 0) + 1
                if plan not in SEALING_PLANS:
                    hint = _suggest(plan, (PLAN_WDPOST, *SEALING_PLANS))
                    self.warnings.append(
                        f'{self.source}: {where}.plan: "{plan}" is no damocles-worker plan (it '
                        f"fails that thread){'; ' + hint if hint else ''}; skipped"
                    )
                continue
            self.unread += unread_keys(raw, THREAD, where)
            if hot is not None:
                self.unread += unread_keys(hot.raw, THREAD, hot.where)
            threads.append(self._thread(i, layers))
        if not threads and not self.errors:
            self.errors.append(
                'no [[sealing_thread]] with plan = "wdpost", so there is no WindowPoSt work to '
                'pull; add one: [[sealing_thread]] with plan = "wdpost"'
                + _miscased(doc, "sealing_thread", "[[{}]]")
                + "".join(f" ({note})" for note in skipped)
            )
        return threads, others

    def _location_loaded(self, raw: dict[str, Any], where: str, seen: dict[str, str]) -> str | None:
        """A note on a thread whose location an earlier thread has, else None (`seen` maps the
        canonical locations so far to their threads). damocles-worker canonicalises each
        thread's location, creating a missing one first (so it gets the name realpath gives
        it), and skips a thread whose store is already loaded, whatever its plan, without
        reading its config.toml; so do we, rather than count one more thread towards the jobs
        at once and the processors' default concurrent."""
        errors_before = len(self.errors)
        location = TypedTable(raw, where, self.errors).string("location")
        if location == "":
            self.errors.append(
                f"{where}.location: empty: damocles-worker cannot make a store there and does"
                " not start; write the thread's directory, or leave location out"
            )
        if len(self.errors) > errors_before:  # damocles-worker refuses it too: not read on
            return f"{where} is skipped: its location is wrong"
        if location is None:
            return None  # a thread without a location has no store to share
        real = os.path.realpath(location)
        if (first := seen.setdefault(real, where)) == where:
            return None
        self.warnings.append(
            f"{self.source}: {where}.location: {_show(location, 1000)} is {first}'s location too"
            f' ({real}); damocles-worker loads a location once and skips this thread ("store'
            f' already loaded"), so it is skipped here too; give each thread its own location'
        )
        return f"{where} is skipped: its location is {first}'s"

    def _hot_config(self, raw: dict[str, Any], where: str) -> TypedTable | None:
        location = raw.get("location")
        if not isinstance(location, str) or not location:
            return None
        path = os.path.join(location, HOT_CONFIG_NAME)
        try:  # opened once, not looked at first: one not there is none, as damocles-worker's
            doc = parse_toml(read_config_text(path, "sealing thread config.toml"), path)
        except ConfigError as exc:  # anything else stops damocles-worker too (a directory, EACCES)
            if exc.errno != errno.ENOENT:
                self.errors.extend(exc.errors)
            return None
        self.warnings.append(
            f"{self.source}: {where}: read {path} once; damocles-ext worker does not reload it "
            f"(restart the worker after changing it)"
        )
        return TypedTable(doc, path, self.errors)

    def _thread(self, index: int, layers: list[TypedTable]) -> WdPostThread:
        miners: tuple[int, ...] = ()
        sizes: tuple[str, ...] = ()
        recover = DEFAULT_RECOVER_INTERVAL
        for layer in layers:  # later layers override, key by key, as damocles merges them
            self._sealing_types(layer)
            if (m := layer.u64_list("allowed_miners")) is not None:
                miners = tuple(dict.fromkeys(m))
            if (raw_sizes := layer.string_list("allowed_sizes")) is not None:
                sizes = tuple(dict.fromkeys(self._sizes(layer.at("allowed_sizes"), raw_sizes)))
            if (seconds := layer.duration("recover_interval")) is not None:
                if seconds > 0:
                    recover = seconds
                else:  # the worker would ask again without a pause
                    self.errors.append(
                        f'{layer.at("recover_interval")}: must be longer than 0, e.g. "60s"'
                    )
        return WdPostThread(index, miners, sizes, recover)

    @staticmethod
    def _sealing_types(layer: TypedTable) -> None:
        """damocles-worker's sealing keys the worker does not use: one of a type damocles-worker
        cannot read (seal_interval = 30) makes it refuse the whole file, so it is an error."""
        for key in ("enable_deals", "disable_cc", "ignore_proof_check", "verify_after_pc2"):
            layer.boolean(key)
        for key in ("max_retries", "request_task_max_retries"):
            layer.integer(key, low=0, high=2**32 - 1)
        layer.integer("max_deals", low=0, high=2**64 - 1)
        for key in ("seal_interval", "rpc_polling_interval"):
            layer.duration(key)

    def _sizes(self, where: str, raw: list[str]) -> list[str]:
        sizes = []
        for i, text in enumerate(raw):
            try:
                sizes.append(sector_size(text))
            except ValueError as exc:
                self.errors.append(f"{where}[{i}]: {exc}")
        return sizes

    def _attached(self, top: TypedTable, worker: TypedTable) -> list[AttachedStore]:
        stores: list[tuple[str, AttachedStore]] = []
        for i, raw in top.tables("attached"):
            where = f"attached[{i}]"
            self.unread += unread_keys(raw, ATTACHED, where)
            table = TypedTable(raw, where, self.errors)
            name = table.string("name", nonempty=True)
            location = table.string("location", nonempty=True)
            readonly = table.boolean("readonly") or False
            if location is None:
                if "location" not in raw:
                    self.errors.append(f"{where}.location: missing; write the store's directory")
                continue
            real = self._store_dir(f"{where}.location", location)
            if real is not None:
                stores.append((where, AttachedStore(name or real, real, readonly)))
        stores += self._scanned(worker)
        seen: dict[str, str] = {}
        for where, store in stores:
            if store.name in seen:
                self.errors.append(
                    f"{where}: store name {_show(store.name)} is also the name of {seen[store.name]};"
                    f" give each store its own name (damocles-worker refuses duplicates too)"
                )
            seen.setdefault(store.name, where)
        if not stores and not self.errors:
            self.errors.append(
                "no [[attached]] store: the worker finds each job's sectors through the stores "
                'it attaches; add [[attached]] with name = "…" (as the manager names it) and '
                'location = "/path/to/store"' + _miscased(top.raw, "attached", "[[{}]]")
            )
        return [store for _, store in stores]

    def _store_dir(self, where: str, location: str) -> str | None:
        # damocles-worker opens each store at start and names it by its canonical path.
        real = os.path.realpath(location)
        if not os.path.isdir(real):
            what = "is not a directory" if os.path.exists(real) else "does not exist"
            self.errors.append(
                f"{where}: {_show(location)} {what}; damocles-worker refuses to start on it "
                f"too: mount the store there or fix the path"
            )
            return None
        return real

    def _scanned(self, worker: TypedTable) -> list[tuple[str, AttachedStore]]:
        if "scan_persist_stores" in worker.raw and "ScanPersistStores" in worker.raw:
            self.errors.append(
                "worker: scan_persist_stores and ScanPersistStores are the same key; keep one"
            )
            return []
        key = "ScanPersistStores" if "ScanPersistStores" in worker.raw else "scan_persist_stores"
        found: list[tuple[str, AttachedStore]] = []
        for i, pattern in enumerate(worker.string_list(key) or []):
            # As the glob crate damocles-worker uses: "*" also matches a name starting with ".",
            # and "**" any depth of directories.
            for path in sorted(glob.glob(pattern, recursive=True, include_hidden=True)):
                store = self._sector_store(f"worker.{key}[{i}]", path)
                if store is not None:
                    found.append((f"worker.{key}[{i}] ({path})", store))
        return found

    def _sector_store(self, where: str, path: str) -> AttachedStore | None:
        meta_path = os.path.join(path, SECTORSTORE_JSON)
        try:
            text = read_config_text(
                meta_path, SECTORSTORE_JSON, what="the store's sectorstore.json"
            )
            meta = json.loads(text)
        except ConfigError as exc:
            # Opened once, not looked at first: one deleted meanwhile is none, not an error.
            # damocles-worker skips a directory without one, or whose sectorstore.json is not
            # a regular file (a directory, a FIFO).
            if exc.errno in (errno.ENOENT, errno.ENOTDIR) or isinstance(exc, NotRegularConfig):
                return None
            narrow = (
                " (damocles-worker stops on it too), or narrow the pattern" if exc.denied else ""
            )
            self.errors.extend(f"{where}: {e}{narrow}" for e in exc.errors)
            return None
        except (ValueError, RecursionError) as exc:
            self.errors.append(f"{where}: {meta_path} is not JSON ({exc}); fix or remove it")
            return None
        if not isinstance(meta, dict):
            self.errors.append(f"{where}: {meta_path} is not a JSON object; fix or remove it")
            return None
        names = [meta.get("Name"), meta.get("ID")]
        name = next((n for n in names if isinstance(n, str) and n), None)
        real = os.path.realpath(path)
        return AttachedStore(name or real, real, meta.get("ReadOnly") is True)

    def _window_post_limit(self, processors: TypedTable) -> int | None:
        limitation = TypedTable.of(
            processors.raw, "limitation", "processors.limitation", self.errors
        )
        # As damocles: [processors.limitation.concurrent], when present, replaces
        # [processors.limit] whole.
        if "concurrent" in limitation.raw:
            limits = TypedTable.of(
                limitation.raw, "concurrent", "processors.limitation.concurrent", self.errors
            )
            if "limit" in processors.raw:
                self.warnings.append(
                    f"{self.source}: [processors.limit] is ignored because "
                    f"[processors.limitation.concurrent] is set (damocles-worker does the same)"
                )
        else:
            limits = TypedTable.of(processors.raw, "limit", "processors.limit", self.errors)
        self.unread += [(limits.where, k, "not used") for k in limits.raw if k != STAGE]
        return limits.integer(STAGE, low=1, high=MAX_CONCURRENT)

    def _children(self, processors: TypedTable, limit: int | None, threads: int) -> list[ChildSpec]:
        # A processor without `concurrent` takes as many proofs as damocles-worker would send
        # it: one per wdpost thread, at most the window_post limit.
        default_concurrent = max(1, min(limit or threads or 1, threads or 1, MAX_CONCURRENT))
        ext_locks = processors.int_map("ext_locks")
        blocks = list(processors.tables(STAGE))
        if not blocks and STAGE not in processors.raw:
            self.warnings.append(
                f"{self.source}: no [[processors.window_post]]: damocles-worker proves in its "
                f"own process then; damocles-ext runs `{DAMOCLES_WORKER} processor {STAGE}` as "
                f"one child (it must be on PATH)"
            )
            blocks = [(0, {})]
        processors_read = []
        for i, raw in blocks:
            where = f"processors.window_post[{i}]"
            self.unread += unread_keys(raw, PROCESSOR, where)
            read = self._child(
                i, TypedTable(raw, where, self.errors), ext_locks, default_concurrent
            )
            if read is not None:
                processors_read.append(read)
        bound = threads if limit is None else min(limit, threads)  # the jobs run at once
        return shared_locks(
            self.source, processors_read, ext_locks, bound, self.warnings, self.errors
        )

    def _child(
        self, index: int, t: TypedTable, ext_locks: dict[str, int], default_concurrent: int
    ) -> Processor | None:
        errors_before = len(self.errors)
        bin_ = t.string("bin", nonempty=True)
        args = t.string_list("args")
        stable_wait = t.duration("stable_wait")
        if stable_wait is not None and not 0 < stable_wait <= MAX_SECONDS:
            self.errors.append(
                f"{t.at('stable_wait')}: expected more than 0s and at most one day, found "
                f"{_show(t.raw['stable_wait'])}"
            )
        cgroup = TypedTable.of(t.raw, "cgroup", t.at("cgroup"), self.errors)
        group = cgroup.string("group_name", nonempty=True)
        cpuset_text = cgroup.string("cpuset")
        cpuset, cpu_errors = _parse_cpuset(t.at("cgroup"), cpuset_text, "cpuset")
        self.errors.extend(cpu_errors)
        numa = t.integer(
            "numa_preferred",
            low=MIN_NUMA_PREFERRED,
            high=MAX_NUMA_NODE,
            expected=(
                f"a NUMA node number from 0 to {MAX_NUMA_NODE}, or -1 for none (libnuma then"
                " allocates on the local node)"
            ),
        )
        concurrent = t.integer("concurrent", low=1, high=MAX_CONCURRENT)
        user_envs = t.envs("envs")
        locks = t.string_list("locks") or []
        for j, lock in enumerate(locks):
            if lock not in ext_locks:
                self.errors.append(
                    f"{t.at('locks')}[{j}]: lock {_show(lock)} is not declared in "
                    f"[processors.ext_locks]; add {lock} = 1 there (damocles-worker fails on "
                    f"its first job without it)"
                )
        auto_restart = t.boolean("auto_restart")
        inherit_envs = t.boolean("inherit_envs")
        if len(self.errors) > errors_before:
            return None
        envs: dict[str, str] = {}
        if cpuset_text is not None:
            # damocles-worker's name for the child's cgroup; the child creates and joins it.
            envs[ENV_CGROUP_NAME] = (
                f"{group or DEFAULT_CGROUP_GROUP}/sub-{STAGE}-{self.pid}-{index}"
            )
            envs[ENV_CGROUP_CPUSET] = cpuset_text
        if numa is not None:
            envs[ENV_NUMA_PREFERRED] = str(numa)
        envs.update(user_envs)  # damocles-worker sets them last too
        # As damocles-worker: `bin`, else its own binary, with `args`, else `processor
        # window_post` (also for a `bin` without `args`; `args = []` runs it with none).
        program, kind = (bin_, "bin") if bin_ is not None else (DAMOCLES_WORKER, "damocles-worker")
        argv = (program, *(args if args is not None else ("processor", STAGE)))
        gpu = envs.get("CUDA_VISIBLE_DEVICES") or None
        # One lock per device, as a [[WdPost]] with Gpus gets: children on one GPU take turns.
        gpu_locks = device_locks(gpu)
        spec = ChildSpec(
            stage=STAGE,
            index=index,
            block=index,
            name=f"{STAGE}#{index}",
            argv=tuple(argv),
            kind=kind,
            envs=envs,
            inherit_envs=True if inherit_envs is None else inherit_envs,
            concurrent=concurrent or default_concurrent,
            weight=DEFAULT_WEIGHT,
            ready_timeout=stable_wait or DEFAULT_STABLE_WAIT,
            protocol="auto",
            plugin=None,
            plugin_options={},
            cpuset=cpuset,
            auto_restart=True if auto_restart is None else auto_restart,
            max_attempts=DEFAULT_MAX_ATTEMPTS,
            request_timeout=None,
            heartbeat_timeout=None,
            cancel_grace=DEFAULT_CANCEL_GRACE,
            locks=tuple(dict.fromkeys([*locks, *gpu_locks])),
            gpu=gpu,
        )
        named = tuple(dict.fromkeys(x for x in locks if x in ext_locks))
        return Processor(spec, named, concurrent is not None)
