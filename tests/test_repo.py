"""The repository's promises about itself: CI runs the README's test command verbatim."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", section, flags=re.DOTALL)


def test_quick_start_has_exactly_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = quick_start_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_layout_is_as_documented():
    for path in [
        "pyproject.toml",
        "damocles_ext",
        "plugins",
        "native",
        "tests",
        "bench",
        "ext-prover.cfg.example",
        "CONTRIBUTING.md",
        "README.md",
        ".ci/run",
    ]:
        assert (ROOT / path).exists(), path


# A module over this many lines is split along its seams (see CONTRIBUTING.md); it is easier to
# find a rule in a module that does one thing.
MAX_MODULE_LINES = 700
# Modules still over it, and why; the list only shrinks.
OVERSIZED: dict[str, str] = {}


def test_no_module_is_over_the_line_limit():
    sources = [p for d in ("damocles_ext", "plugins", "bench") for p in (ROOT / d).rglob("*.py")]
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in sources}
    over = {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}
    new = {name: n for name, n in over.items() if name not in OVERSIZED}
    assert not new, (
        f"split these modules along their seams (at most {MAX_MODULE_LINES} lines): {new}"
    )
    shrunk = sorted(name for name in OVERSIZED if lengths.get(name, 0) <= MAX_MODULE_LINES)
    assert not shrunk, f"{shrunk} are within the limit now (or gone): remove them from OVERSIZED"


# What must stay free of I/O: a package (all its modules) or one module, relative to damocles_ext/.
# A module that becomes sans-IO joins with one line.
SANS_IO = [
    "protocol",  # the dext/1 and JSON-lines codecs
    "scheduling",  # the dispatch policy and the simulator that drives it
    "supervisor/connection.py",  # one child's handshake and message stream
    "supervisor/restart.py",  # the restart rules
    "stages.py",  # the stage list and the split WindowPoSt rule
    "lifecycle",  # the request book: requests, attempts, retries, timeouts
    "jobs/model.py",  # damocles' WindowPoSt job record and its id
    "jobs/rules.py",  # the job transitions, fencing, deadlines
    "jobs/listing.py",  # damocles' `wdpost list` table
    "jobs/rpc.py",  # the worker-prover RPC as JSON-RPC 2.0 bodies
    "jobs/summary.py",  # the job store's summary: live workers, unallocatable jobs
    "jobs/endpoint.py",  # the RPC addresses: multiaddrs, URLs, HOST:PORT
    "jobs/log_lines.py",  # a sweep's log line, the fields of a record about one job
    "jobs/held_rows.py",  # when a job whose row is held, its heartbeats passed over, is warned of
    "config/damocles_worker_keys.py",  # damocles-worker.toml's keys, durations, sector sizes
    "config/damocles_worker_values.py",  # typed reads of damocles-worker.toml's tables
    "config/damocles_worker_locks.py",  # damocles-worker.toml's ext locks made ours
    "jobs/outage.py",  # one line when something starts failing, one when it works again
    "jobs/stalls.py",  # the job store's calls in flight, a stall's warning and its end
    "jobs/paths.py",  # a sector's paths <-> damocles store names
    "jobs/worker_rules.py",  # the worker's decisions: what to ask for, retry, give up, paths
    "jobs/worker_settings.py",  # the worker's inputs, whatever read them
    "jobs/worker_status.py",  # the worker part of the status document and its table
    "sectors/model.py",  # sector refs, locations, answers, providers, time bounds
    "sectors/cache.py",  # the sector locations remembered and their freshness rules
    "sectors/comm_r.py",  # prove --comm-r: the sector list and the comm_r file
    "wording.py",  # wording shared by messages of several layers ('a, b and 3 more')
]
IO_IMPORT = re.compile(
    r"^\s*(import|from)\s+(trio|os|subprocess|socket|select|asyncio|time)\b", re.MULTILINE
)


def sans_io_sources() -> list[Path]:
    sources = []
    for entry in SANS_IO:
        path = ROOT / "damocles_ext" / entry
        assert path.exists(), f"{entry} is listed as sans-IO but is not in damocles_ext/"
        sources += sorted(path.glob("*.py")) if path.is_dir() else [path]
    return sources


@pytest.mark.parametrize("source", sans_io_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_sans_io_modules_import_no_io(source: Path):
    assert not IO_IMPORT.search(source.read_text()), f"{source} does I/O imports"


async def test_the_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)\n```", section, flags=re.DOTALL)
    (tmp_path / "ext-prover.cfg").write_text('[[WdPost]]\nPlugin = "echo"\n')
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    task = WindowPoSt(
        1000, "StackedDrgWindow2KiBV1_2", [PoStReplicaInfo(1, bytes(32), "/c", "/s")], bytes(32)
    )
    await namespace["main"](task)
    out = capsys.readouterr().out
    assert "SupervisorStats(" in out and "no proof" not in out


def test_check_config_takes_the_file_as_an_argument_too(capsys):
    from damocles_ext import cli

    assert cli.main(["check-config", str(ROOT / "ext-prover.cfg.example")]) == 0
    assert "window_post#0" in capsys.readouterr().out


def test_the_one_stage_list_names_exactly_the_task_types():
    from damocles_ext import stages, tasks

    assert set(tasks.TASK_TYPES) == set(tasks.OUTPUT_TYPES) == set(stages.STAGES)
    assert set(stages.POST_STAGES) < set(stages.STAGES)
    assert tasks.STAGES is stages.STAGES and tasks.POST_STAGES is stages.POST_STAGES


def test_the_cli_parsers_and_serves_entry_import_neither_msgspec_nor_trio():
    # serve's ready line must beat damocles-manager's 5 s limit on a loaded machine: building the
    # parsers (where the stage choices are) and reaching serve's entry must stay light.
    code = (
        "import sys\n"
        "from damocles_ext import cli\n"
        "import damocles_ext.frontends.serve\n"
        "for command in ('serve', 'prove', 'verify', 'child'):\n"
        "    try:\n"
        "        cli.main([command, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('msgspec', 'trio') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert done.stdout.decode().splitlines()[-1] == "[]", done.stdout.decode()


# Public class names the supervisor's rewrite is still taking apart; nothing else may join.
SHARED_CLASS_NAMES_BEING_RENAMED: set[str] = set()


def test_no_two_public_classes_share_a_name():
    # Two classes of one name (a scheduler decision and a wire frame, both `Cancel`) make every
    # import a guess and every traceback ambiguous.
    where: dict[str, list[str]] = {}
    for path in sorted((ROOT / "damocles_ext").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    shared = {
        name: paths
        for name, paths in where.items()
        if len(paths) > 1 and name not in SHARED_CLASS_NAMES_BEING_RENAMED
    }
    assert shared == {}
