"""Can the children start here? The checks `serve`, `run`, `prove -c` and check-config make
before starting anything, so that a child that could never start fails the start.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

from ..options import OPTIONS_ENV, options_env_value
from ..regular_file import file_kind, open_regular
from ..trusted_path import UntrustedPathError, resolve_trusted
from . import machine
from .machine import untrusted_problem
from .messages import _show, _toml_key
from .spec import (
    DAMOCLES_WORKER,
    TABLE_OF_STAGE,
    TMP_ROOT_ENV,
    ChildSpec,
    Config,
    ConfigError,
    format_cpuset,
)

if TYPE_CHECKING:
    from ..plugins import DextPluginManager


#: How much of a program's start is read for its #! line (the kernel reads 256 bytes).
_SHEBANG_READ = 256


def _head(program: str) -> bytes | None:
    """The first 256 bytes of `program`, a regular file (never blocks on a FIFO nor opens a
    device); None when it is not one or cannot be read."""
    try:
        fd = open_regular(program)
    except OSError:  # NotRegularFile too
        return None
    try:
        return os.read(fd, _SHEBANG_READ)
    except OSError:
        return None
    finally:
        os.close(fd)


def missing_interpreter(program: str, head: bytes | None = None) -> str | None:
    """The interpreter that `program`'s #! line names when it does not exist (exec then fails
    with ENOENT, as if the program itself were missing); None if it has no such line, if that
    interpreter exists, or if it cannot be read. Reads at most its first 256 bytes, of a regular
    file only (never blocks on a FIFO or a device); `head`: those bytes, when read already."""
    head = _head(program) if head is None else head
    if head is None or not head.startswith(b"#!"):
        return None
    # As the kernel reads it: the first word after "#!", up to a space, a tab or the line's end
    # (a CR of a file saved with CRLF is part of the name).
    line = head[2:].split(b"\n", 1)[0].lstrip(b" \t")
    interpreter = line.replace(b"\t", b" ").split(b" ", 1)[0]
    if not interpreter or os.path.exists(interpreter):
        return None
    return os.fsdecode(interpreter)


def interpreter_problem(program: str) -> str | None:
    """What is wrong with the #! interpreter of `program` (a regular file), or None."""
    interpreter = missing_interpreter(program)
    return None if interpreter is None else _no_interpreter(interpreter)


def _no_interpreter(interpreter: str) -> str:
    return (
        f"exists, but the interpreter its #! line names, {interpreter!r}, was not found;"
        " install it or fix the #! line"
    )


_ELF = b"\x7fELF"
#: ELF e_machine numbers, named as an operator knows them.
_MACHINES = {3: "x86 (32-bit)", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "s390x",
             40: "ARM (32-bit)", 62: "x86-64", 183: "AArch64 (arm64)", 243: "RISC-V"}  # fmt: skip
#: Machines of one family: a 64-bit kernel runs its 32-bit kind's programs (where built with
#: them), and a 32-bit Python (this process) may run on a 64-bit kernel: never judged apart.
_FAMILIES = (frozenset({3, 62}), frozenset({40, 183}), frozenset({20, 21}), frozenset({2, 18, 43}))


def _elf_header(head: bytes) -> tuple[int, int] | None:
    """(e_type, e_machine) of an ELF file's first bytes, or None."""
    if len(head) < 20 or not head.startswith(_ELF) or head[5] not in (1, 2):
        return None
    order: Literal["little", "big"] = "big" if head[5] == 2 else "little"  # EI_DATA
    return int.from_bytes(head[16:18], order), int.from_bytes(head[18:20], order)


@functools.cache
def _our_machine() -> int | None:
    """This process's ELF e_machine (/proc/self/exe), or None when it cannot be read."""
    ours = _elf_header(_head("/proc/self/exe") or b"")
    return None if ours is None else ours[1]


def other_formats() -> bool:
    """True when binfmt_misc has formats registered (qemu-user, Java, wine...): exec may then run
    files that are neither scripts nor programs for this machine, and they are not judged."""
    try:
        return any(n not in ("register", "status") for n in os.listdir("/proc/sys/fs/binfmt_misc"))
    except OSError:
        return False


def _machine(number: int) -> str:
    return _MACHINES.get(number, f"ELF machine {number}")


def format_problem(program: str, head: bytes | None = None) -> str | None:
    """Why exec would refuse the format of `program` (a regular, executable file: ENOEXEC, 'Exec
    format error'), and what to do; None when it is a script with a #! line, a program for this
    machine, or cannot be judged; `head`: its first bytes, when read already."""
    head = _head(program) if head is None else head
    if head is None or head.startswith(b"#!"):
        return None
    problem = _format_problem(head)
    return None if problem is None or other_formats() else problem


def _format_problem(head: bytes) -> str | None:
    header = _elf_header(head)
    if header is None:
        if head.startswith(_ELF):
            return None  # a header cut short or of an odd kind: left to exec
        if head.startswith(b"\xef\xbb\xbf#!"):
            return (
                "starts with a UTF-8 byte order mark (BOM) before its #! line, so exec does not"
                " see the line and refuses it (Exec format error); save it without the BOM"
                " (e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' on it)"
            )
        return (
            "is neither a program for this machine nor a script with a #! line, so exec refuses"
            " it (Exec format error); add a #! line naming its interpreter (e.g. #!/bin/sh), or"
            " give the path of the prover program"
        )
    ours, (kind, machine) = _our_machine(), header
    if kind not in (2, 3):  # ET_EXEC, ET_DYN: an object file or a core dump is not run
        return (
            "is an ELF file but not a program (an object file or a core dump?); give the path"
            " of the prover program"
        )
    if ours is None or machine == ours or any({machine, ours} <= f for f in _FAMILIES):
        return None  # this machine's, of its family (a 32-bit kind of it), or not known
    return (
        f"is a program for {_machine(machine)}, and this machine is {_machine(ours)}, so"
        " exec refuses it (Exec format error); install the prover built for this machine"
    )


def program_problem(program: str, search_path: str | None = None) -> str | None:
    """Why `program` (argv[0]) cannot be executed on this machine, and what to do; None if it can.

    A name without '/' is looked up in `search_path` (a PATH value; default: ours), as exec does.
    """
    fix = "give the path of the prover program"
    shown = _show(program, limit=1000)  # a path is no use cut short
    if "/" not in program:
        search_path = os.defpath if search_path is None else search_path
        if shutil.which(program, path=search_path) is not None:
            return None
        return (
            f"{shown} is not found on PATH ({search_path}); give its path, or put its "
            f"directory on PATH"
        )
    try:
        st = os.stat(program)
    except FileNotFoundError:
        if program.startswith("~") and (home := os.path.expanduser(program)) != program:
            # damocles' own docs write `bin = "~/my_algorithm"`; no shell expands it, there or here.
            return (
                f"{shown} does not exist: '~' is a shell's shorthand, and no shell runs the"
                f" program (nor in damocles); write the full path, e.g. {_show(home, limit=1000)}"
            )
        return f"{shown} does not exist; {fix}"
    except OSError as exc:  # a path component that is a file, or a directory we may not enter
        return f"{shown} cannot be reached: {exc.strerror or exc}; {fix}"
    if not stat.S_ISREG(st.st_mode):  # a directory, a FIFO, a device...
        return f"{shown} is {file_kind(st.st_mode)}, not a program; {fix}"
    if not os.access(program, os.X_OK):
        return (
            f"{shown} is not executable (mode {stat.S_IMODE(st.st_mode):04o}); make it "
            f"executable (chmod +x) or {fix}"
        )
    head = _head(program)
    interpreter = missing_interpreter(program, head)
    problem = _no_interpreter(interpreter) if interpreter else format_problem(program, head)
    if problem is not None:
        return f"{shown} {problem}"
    return None


def build_env(inherit: bool, envs: Mapping[str, str]) -> dict[str, str]:
    """A child's environment: ours (unless InheritEnvs = false) plus its Envs. The supervisor
    spawns the child with it; the checks here look at the same one."""
    env = dict(os.environ) if inherit else {}
    env.update(envs)
    return env


def child_env(child: ChildSpec) -> dict[str, str]:
    """The environment `child` is spawned with: build_env's, and a plugin child's PluginOptions
    in OPTIONS_ENV; one inherited from ours is never passed on (a Bin child running our runtime
    would take it for its own options)."""
    env = build_env(child.inherit_envs, child.envs)
    if OPTIONS_ENV not in child.envs:  # (a Bin child's own Envs may set it, to run our runtime)
        env.pop(OPTIONS_ENV, None)
    if child.kind == "plugin" and child.plugin_options:
        env[OPTIONS_ENV] = options_env_value(child.plugin_options)
    return env


def env_value(inherit: bool, envs: Mapping[str, str], name: str) -> str | None:
    """The value of `name` in the environment build_env makes (None: unset), without it."""
    if name in envs:
        return envs[name]
    return os.environ.get(name) if inherit else None


def _search_path(env: Mapping[str, str]) -> str:
    """The PATH the child's program is looked up in, as exec does."""
    return env.get("PATH", os.defpath)


class _Names(NamedTuple):
    """How a config format names a child's table and keys, for the messages about them."""

    table: str  # formatted with the stage's table name and the child's block
    bin: str
    args: str
    envs: str
    cpuset: str
    no_program: str  # what runs when the table names no program
    set_program: str
    gpus: str  # where a child's GPUs are given
    own_gpus: str  # what gives a child GPUs of its own


_NAMES = {
    "ext-prover.cfg": _Names(
        "{table}[{block}]", "Bin", "Args", "Envs", "Cpuset",
        "no Bin or Plugin, so the child runs damocles' default", "set Bin or Plugin",
        "Gpus or Envs", "Gpus or an Envs",
    ),
    "damocles-worker.toml": _Names(
        "processors.window_post[{block}]", "bin", "args", "envs", "cgroup.cpuset",
        "no bin, so the child runs damocles-worker's own processor", "set bin", "envs",
        "envs",
    ),
}  # fmt: skip


def _table(child: ChildSpec, names: _Names) -> str:
    """The child's table as its file names it: WdPost[0], processors.window_post[0]."""
    return names.table.format(table=TABLE_OF_STAGE.get(child.stage, child.stage), block=child.block)


def _unencodable_problems(where: str, child: ChildSpec, names: _Names) -> list[str]:
    """Args, Envs or a Bin that exec cannot be given in this locale's encoding (a character of
    another script under a Latin-1 locale): every start of the child would fail."""
    if child.kind == "plugin":  # its options travel as ASCII JSON (child_env)
        named = [(f"{where}.Plugin", a) for a in child.argv[1:]]
    else:
        named = [(f"{where}.{names.bin}", child.argv[0])]
        named += [(f"{where}.{names.args}[{i}]", a) for i, a in enumerate(child.argv[1:])]
    named += [(f"{where}.{names.envs}.{_toml_key(k)}", f"{k}={v}") for k, v in child.envs.items()]
    problems = []
    for name, text in named:
        try:
            os.fsencode(text)
        except UnicodeEncodeError as exc:
            problems.append(
                f"{name}: {exc.object[exc.start]!r} cannot be passed to the child in this"
                f" locale's encoding ({exc.encoding}); run damocles-ext in a UTF-8 locale"
                " (LANG=C.UTF-8, say)"
            )
    return problems


def _exec_size_problems(where: str, child: ChildSpec, names: _Names) -> list[str]:
    """Args or Envs too big for exec (E2BIG), which would fail every start of the child."""
    # Linux's MAX_ARG_STRLEN: 32 pages for one argument or variable, its NUL included.
    most = 32 * os.sysconf("SC_PAGESIZE")
    problems: list[str] = []
    env = child_env(child)
    if child.kind == "plugin":  # its options are its only long string, in one variable
        named = []
        if child.plugin_options:  # all in one variable: say which is the longest
            longest = max(child.plugin_options, key=lambda k: len(str(child.plugin_options[k])))
            name = f"{where}.PluginOptions (all of them, in one variable; the longest: {longest})"
            named.append((name, f"{OPTIONS_ENV}={env[OPTIONS_ENV]}"))
    else:
        named = [(f"{where}.{names.args}[{i}]", a) for i, a in enumerate(child.argv[1:])]
    named += [(f"{where}.{names.envs}.{_toml_key(k)}", f"{k}={v}") for k, v in child.envs.items()]
    for name, text in named:
        size = len(os.fsencode(text)) + 1
        if size > most:
            problems.append(
                f"{name}: {size} bytes, but exec takes at most {most} per argument or "
                f"environment variable (Linux's MAX_ARG_STRLEN); pass it in a file instead"
            )
    strings = [*child.argv, *(f"{k}={v}" for k, v in env.items())]
    total = sum(len(os.fsencode(t)) + 1 + 8 for t in strings)  # and a pointer to each
    try:
        limit = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        limit = -1
    if not problems and 0 < limit < total:
        problems.append(
            f"{where}: the command line and environment take {total} bytes (Args, Envs and the "
            f"inherited environment), more than exec takes here ({limit}, ARG_MAX); shorten them"
        )
    return problems


def startup_problems(
    children: list[ChildSpec],
    *,
    plugin_manager: DextPluginManager | None = None,
    dialect: str = "ext-prover.cfg",
) -> list[str]:
    """Why some of `children` could not start on this machine, each naming its table and key.

    What is checked needs no child started: the program (Bin, or damocles-worker) exists and is
    executable, the command line and environment fit exec's limits and the locale's encoding,
    the Cpuset's CPUs are ours to use, and a Plugin is installed and accepts its PluginOptions
    (its validate_options and the dext_validate_plugin_options hooks). A Gpus table's children share one table, so each table
    is checked once. `dialect` is the file's format (Config.dialect), whose names are used.
    """
    names = _NAMES[dialect]
    problems: list[str] = []
    blocks: dict[tuple[str, int], ChildSpec] = {}
    for child in children:
        blocks.setdefault((child.stage, child.block), child)
    try:
        usable = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux: prepare_spawn's check is the only one
        usable = None
    for (stage, _block), child in blocks.items():
        where = _table(child, names)
        unencodable = _unencodable_problems(where, child, names)
        if unencodable:  # the checks below would fail on them too
            problems.extend(unencodable)
            continue
        if child.kind != "plugin":
            search_path = _search_path(build_env(child.inherit_envs, child.envs))
            problem = program_problem(child.argv[0], search_path)
            if problem is not None and child.kind == "bin":
                problems.append(f"{where}.{names.bin}: {problem}")
            elif problem is not None:
                problems.append(
                    f"{where}: {names.no_program} `{DAMOCLES_WORKER} processor {stage}`, but"
                    f" {DAMOCLES_WORKER} is not found on PATH ({search_path});"
                    f" {names.set_program}, or put {DAMOCLES_WORKER} on PATH"
                )
        problems.extend(_exec_size_problems(where, child, names))
        if child.cpuset and usable is not None and not child.cpuset <= usable:
            missing = format_cpuset(child.cpuset - usable)
            problems.append(
                f"{where}.{names.cpuset}: CPUs {missing} are not ones this process may use (this "
                f"machine gives it {format_cpuset(frozenset(usable))}); use those"
            )
    roots = {os.path.dirname(os.path.normpath(c.envs["TMPDIR"])) for c in children
             if c.private_tmpdir and "TMPDIR" in c.envs}  # fmt: skip
    for root in sorted(roots):
        if (problem := tmp_root_problem(root)) is not None:
            problems.append(
                f"the tmp root {root}, where Gpus puts each child's TMPDIR, {problem}; set"
                f" {TMP_ROOT_ENV} to a directory of your own (or unset it for the default)"
            )
    plugin_blocks = [c for c in blocks.values() if c.kind == "plugin"]
    if plugin_blocks:
        from ..plugins import get_plugin_manager, prover_problems

        pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
        for child in plugin_blocks:
            where = f"{TABLE_OF_STAGE[child.stage]}[{child.block}]"
            assert child.plugin is not None
            for problem in prover_problems(
                pm, child.plugin, dict(child.plugin_options), child.stage
            ):
                problems.append(f"{where}.Plugin: {problem}")
    return problems


def tmp_root_problem(root: str) -> str | None:
    """Why the tmp root `root` could not hold the TMPDIRs that Gpus gives its children, or None.
    Read-only: the spawn makes what is missing, and checks again on what it opened."""
    try:
        link = os.lstat(root)
    except OSError:
        link = None
    if link is not None and stat.S_ISLNK(link.st_mode):
        # The spawn makes the link's target, missing parents and all, not the link's parents.
        return untrusted_problem(link, os.geteuid(), link=True) or _made_later(
            os.path.realpath(root), root
        )
    return _made_later(root, root)


def _made_later(root: str, given: str) -> str | None:
    """tmp_root_problem of `root` as the spawn will find it, a symlink followed: `given`, the
    path the children get, leads to it."""
    path = root
    while True:
        try:
            st = os.stat(path)  # a symlink is followed, as the spawn follows one of ours
            break
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if parent == path:
                return "cannot be made"
            # Made with its missing parents at the first spawn, those 0755 whatever the umask:
            # they pass the check of the directories above the root, as this one does.
            path = parent
        except NotADirectoryError:
            return "cannot be made: a part of its path is not a directory"
        except OSError as exc:
            return f"cannot be read: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return (
            "is not a directory" if path == root else f"cannot be made: {path} is not a directory"
        )
    if path != root and not os.access(path, os.W_OK | os.X_OK):
        return f"cannot be made: this user may not create anything in {path}"
    if path == root and (problem := untrusted_problem(st, os.geteuid())) is not None:
        return problem
    try:
        # As the spawn checks it: the directories above it too, and, when it is reached through
        # a link, the link's own directories (the children go through it).
        resolve_trusted(given)
    except UntrustedPathError as exc:
        return f"is under a directory another user could change: {exc}"
    except OSError:
        pass  # the spawn says what it finds
    return None


def gpu_numbers(child: ChildSpec) -> list[int]:
    """The GPUs `child` is given by number (its CUDA_VISIBLE_DEVICES, from Envs or inherited),
    in order; [] when it names none by number (unset, empty, UUIDs or MIG instances)."""
    value = env_value(child.inherit_envs, child.envs, "CUDA_VISIBLE_DEVICES") or ""
    devices = [d.strip() for d in value.split(",") if d.strip()]
    if devices and all(d.isascii() and d.isdigit() for d in devices):
        return [int(d) for d in devices]
    return []


def absent_gpu_warnings(
    children: Sequence[ChildSpec],
    found: Sequence[int] | None = None,
    *,
    dialect: str = "ext-prover.cfg",
) -> list[str]:
    """Children pinned to a GPU number this machine does not have (a config written for a
    machine of more GPUs): CUDA hides that GPU and every one listed after it, and a child left
    with none proves on the CPU (bellperson's fallback), far too slowly for any deadline, while
    taking the CPU from the others. `found`: the GPUs the config's parse found already
    (`Config.gpus_found`); else the driver is asked, only when a child names a GPU by number
    (without persistence mode each asking takes seconds). Nothing is said when it gives no
    list (not loaded yet, no NVML nor nvidia-smi). `dialect`: as for startup_problems."""
    pinned = [(c, numbers) for c in children if (numbers := gpu_numbers(c))]
    if not pinned:
        return []
    listed = machine.probe_gpus().gpus if found is None else found
    if not listed:
        return []
    count = len(listed)
    if list(listed) != list(range(count)):  # one lost among them: not 0 to count - 1
        has = f"GPUs {', '.join(map(str, listed))}"
    else:
        has = "GPU 0" if count == 1 else f"GPUs 0 to {count - 1}"
    out = []
    for child, numbers in pinned:
        absent = [n for n in numbers if n not in listed]
        if absent:
            names = _NAMES[dialect]
            table = _table(child, names)
            where = (
                f"remove it from {table}'s {names.gpus}"
                if "CUDA_VISIBLE_DEVICES" in child.envs
                else "it is inherited from damocles-ext's own environment (e.g. its unit's"
                f" Environment=): remove it there, or give {table} {names.own_gpus} of its own"
            )
            out.append(
                f"{child.name}: its CUDA_VISIBLE_DEVICES={','.join(map(str, numbers))} names"
                f" GPU {', '.join(map(str, absent))}, which this machine does not have (it has"
                f" {has}, as NVML or nvidia-smi -L count them): CUDA hides it, and every GPU"
                " listed after it, from the child, which with no GPU left proves on the CPU, far"
                f" too slowly for a deadline; {where}"
            )
    return out


def check_startable(
    config: Config,
    children: list[ChildSpec] | None = None,
    *,
    plugin_manager: DextPluginManager | None = None,
) -> None:
    """Raise ConfigError listing startup_problems of `children` (default: all the config's).

    `serve`, `run` and `prove -c` call it before they report ready, so that a child that could
    never start fails the start, as damocles' own processor does, instead of each request.
    """
    problems = startup_problems(
        config.children if children is None else children,
        plugin_manager=plugin_manager,
        dialect=config.dialect,
    )
    if problems:
        raise ConfigError(config.source, problems)
