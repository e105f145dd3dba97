"""deploy/: the systemd units are valid (systemd-analyze verify), their commands parse with our
CLI, their stop timeouts cover our graceful stop, they hold no secret; the Grafana dashboard's
queries name only metrics that a live supervisor and a live coordinator register."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.promql import live_families, metric_names, query_problems, series_names

from damocles_ext import cli
from damocles_ext.frontends.coordinator import STOP_GRACE
from damocles_ext.supervisor.core import Supervisor
from damocles_ext.supervisor.reaper import REAP_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
UNITS = sorted(SYSTEMD.glob("*.service"))
DASHBOARD = ROOT / "deploy" / "grafana" / "damocles-ext.json"
INSTALLED = "/opt/damocles-ext/bin/damocles-ext"  # where the units expect the program


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections, each key with every value it is given (systemd's syntax: no
    continuation lines in ours)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    """A systemd time span of the forms our units use: 30s, 10min, 2min30s."""
    units = {"s": 1, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*(min|s|h)", value)
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), value
    return sum(int(n) * units[u] for n, u in parts)


def test_there_is_a_unit_for_run_coordinator_and_worker():
    assert [u.name for u in UNITS] == [
        "damocles-ext-coordinator.service",
        "damocles-ext-run.service",
        "damocles-ext-worker.service",
    ]


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.stem)
def test_each_unit_restarts_with_backoff_as_a_dedicated_user_with_its_directories(path):
    service = unit(path)["Service"]
    assert service["User"] == ["damocles-ext"] and service["Group"] == ["damocles-ext"]
    assert service["Restart"] == ["on-failure"]
    assert seconds(service["RestartSec"][0]) >= 1 and "RestartMaxDelaySec" in service
    assert service["RestartPreventExitStatus"] == ["2"]  # a usage error does not loop
    assert service["StateDirectory"] and service["RuntimeDirectory"]
    # SIGTERM to damocles-ext alone, which stops its children itself.
    assert service["KillMode"] == ["mixed"] and service["KillSignal"] == ["SIGTERM"]
    # The user the units run as is the one the sysusers file creates.
    sysusers = (SYSTEMD / "damocles-ext.sysusers").read_text()
    assert re.search(r"^u damocles-ext ", sysusers, re.MULTILINE)


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.stem)
def test_each_unit_has_systemd_restart_a_hung_damocles_ext(path):
    # The command pings from its loop (test_watchdog.py) a third of the time systemd waits.
    service = unit(path)["Service"]
    assert service["NotifyAccess"] == ["main"]
    assert 30 <= seconds(service["WatchdogSec"][0]) <= 120


def test_runs_stop_timeout_outlasts_its_graceful_stop():
    service = unit(SYSTEMD / "damocles-ext-run.service")["Service"]
    argv = shlex.split(service["ExecStart"][0])
    grace = float(argv[argv.index("--shutdown-grace") + 1])
    stop = inspect.signature(Supervisor).parameters["stop_timeout"].default
    # The proofs' grace, then each child's Shutdown -> SIGTERM -> SIGKILL, then its reap and
    # the end of the rest of its process group.
    assert seconds(service["TimeoutStopSec"][0]) > grace + 2 * stop + 2 * REAP_TIMEOUT


def test_the_workers_proofs_get_minutes_to_finish_and_its_stop_timeout_outlasts_that():
    service = unit(SYSTEMD / "damocles-ext-worker.service")["Service"]
    argv = shlex.split(service["ExecStart"][0])
    # Without --shutdown-grace the worker cancels its proofs after the default 30 s, however
    # long systemd would wait: a 32GiB partition takes minutes on a GPU.
    assert "--shutdown-grace" in argv
    grace = float(argv[argv.index("--shutdown-grace") + 1])
    assert grace >= 120
    stop = inspect.signature(Supervisor).parameters["stop_timeout"].default
    # The proofs' grace, the grace again to report them, the grace once more for the proofs
    # cancelled then, then each child's Shutdown -> SIGTERM -> SIGKILL, its reap and its group's.
    assert seconds(service["TimeoutStopSec"][0]) > 3 * grace + 2 * stop + 2 * REAP_TIMEOUT


def test_the_coordinator_on_sqlite_does_not_take_damocles_managers_port(tmp_path):
    # A SQLite store is shared with damocles-manager's `serve --jobs`, so the coordinator runs on
    # damocles-manager's machine, whose own RPC listens on 1789: a coordinator there on 1789
    # exits 2 (a busy port), which its unit does not restart.
    path = SYSTEMD / "damocles-ext-coordinator.service"
    drop_in = drop_ins(ROOT / "docs" / "DEPLOY.md")[path.stem]
    for service in [unit(path)["Service"], with_drop_in(path, drop_in, tmp_path)["Service"]]:
        argv = shlex.split(service["ExecStart"][0])
        jobs = argv[argv.index("--jobs") + 1]
        listen = argv[argv.index("--listen") + 1]
        assert jobs.startswith("sqlite:")
        assert not listen.endswith(":1789"), listen


def test_the_coordinators_stop_timeout_outlasts_its_graceful_stop():
    service = unit(SYSTEMD / "damocles-ext-coordinator.service")["Service"]
    assert seconds(service["TimeoutStopSec"][0]) > STOP_GRACE


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.stem)
def test_no_secret_is_written_in_a_unit(path):
    text = path.read_text()
    assert not re.search(r"(?i)bearer\s+\S", text)
    assert not re.search(r"postgresql://[^/\s@]*:[^/\s@]*@", text)  # a password in a URL
    service = unit(path)["Service"]
    for env in service.get("Environment", []):
        assert not re.search(r"(?i)(token|password|secret)\w*=", env), env
    # A token is a credential systemd hands over (%d), never a path others may read.
    argv = shlex.split(service["ExecStart"][0])
    if "--token-file" in argv:
        credential = argv[argv.index("--token-file") + 1]
        assert credential.startswith("%d/"), credential
        name = credential.removeprefix("%d/")
        assert any(c.startswith(f"{name}:") for c in service["LoadCredential"])


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.stem)
def test_each_units_command_parses_with_our_cli(path, tmp_path, capsys):
    service = unit(path)["Service"]
    [exec_start] = service["ExecStart"]
    program, command, *args = shlex.split(exec_start)
    assert program == INSTALLED
    if importlib.util.find_spec(f"damocles_ext.commands.{command}") is None:
        pytest.skip(
            f"`damocles-ext {command}` is not in this build, so its options cannot be checked"
        )
    # The specifiers as systemd fills them in; credentials as LoadCredential hands them over.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for credential in service.get("LoadCredential", []):
        (credentials / credential.partition(":")[0]).write_text("a-token\n")
    values = {"%t": "/run", "%S": "/var/lib", "%d": str(credentials), "%H": "host", "%%": "%"}
    args = [re.sub(r"%[tSdH%]", lambda m: values[m.group()], a) for a in args]
    try:
        parsed = cli.build_parser().parse_args([command, *args])
    except SystemExit:
        pytest.fail(f"{path.name}: `damocles-ext {command}` refuses its arguments: "
                    f"{capsys.readouterr().err}")  # fmt: skip
    assert parsed.command == command


def systemd_version() -> int:
    out = subprocess.run(
        ["systemd-analyze", "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return int(re.match(r"systemd (\d+)", out).group(1))


# Keys of newer systemds than some we support: an older one ignores them, with this warning.
NEWER_KEYS = {"RestartSteps": 254, "RestartMaxDelaySec": 254}


def drop_ins(doc: Path) -> dict[str, str]:
    """The drop-ins a doc shows (```ini blocks whose first line names `systemctl edit UNIT`):
    each unit's name and the drop-in's text."""
    found = {}
    for block in re.findall(r"```ini\n(.*?)```", doc.read_text(), re.DOTALL):
        text = textwrap.dedent(block)
        if m := re.match(r"# systemctl edit (\S+?):", text):
            found[m.group(1)] = text
    return found


def with_drop_in(path: Path, drop_in: str, tmp_path: Path) -> dict[str, dict[str, list[str]]]:
    """The unit as systemd reads it with the drop-in: an empty assignment clears a key's list."""
    merged = unit(path)
    extra = tmp_path / "drop-in.conf"
    extra.write_text(drop_in)
    for section, keys in unit(extra).items():
        target = merged.setdefault(section, {})
        for key, values in keys.items():
            for value in values:
                target[key] = [] if value == "" else [*target.get(key, []), value]
    return merged


def test_the_coordinators_drop_in_for_damocles_workers_starts_without_a_token_file(tmp_path):
    # A damocles-worker sends no token. A coordinator without --token-file that still loads
    # the credential fails to start when its file is missing: systemd's 243/CREDENTIALS.
    path = SYSTEMD / "damocles-ext-coordinator.service"
    drop_in = drop_ins(ROOT / "docs" / "DEPLOY.md")[path.stem]
    service = with_drop_in(path, drop_in, tmp_path)["Service"]
    [exec_start] = service["ExecStart"]
    program, command, *args = shlex.split(exec_start)
    assert program == INSTALLED and command == "coordinator"
    values = {"%S": "/var/lib", "%%": "%"}
    args = [re.sub(r"%[S%]", lambda m: values[m.group()], a) for a in args]
    parsed = cli.build_parser().parse_args([command, *args])
    assert parsed.token_file is None
    assert service.get("LoadCredential", []) == []
    # The rest of the unit's command is kept.
    assert exec_start == unit(path)["Service"]["ExecStart"][0].replace(
        " --token-file %d/coordinator-token", ""
    )


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here"
)
def test_the_units_pass_systemd_analyze_verify(tmp_path):
    # verify wants the program to exist: point the copies at this build's damocles-ext.
    program = Path(sys.executable).parent / "damocles-ext"
    assert program.exists()
    copies = []
    for path in UNITS:
        copy = tmp_path / path.name
        copy.write_text(path.read_text().replace(INSTALLED, str(program)))
        copies.append(str(copy))
    done = subprocess.run(
        ["systemd-analyze", "verify", *copies],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    version = systemd_version()
    problems = [
        line
        for line in done.stderr.splitlines()
        if not any(
            f"Unknown key '{key}'" in line and version < since for key, since in NEWER_KEYS.items()
        )
    ]
    assert done.returncode == 0 and problems == [], done.stderr


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed here"
)
def test_the_sysusers_file_parses(tmp_path):
    # --dry-run into an empty root: nothing is created on this machine.
    done = subprocess.run(
        ["systemd-sysusers", "--dry-run", f"--root={tmp_path}", "-"],
        check=False,
        input=(SYSTEMD / "damocles-ext.sysusers").read_text(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Creating user 'damocles-ext'" in done.stdout + done.stderr


# -- the dashboard ---------------------------------------------------------------------------------


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    names: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names |= metric_names(target["expr"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            if m := re.fullmatch(r"query_result\((.*)\)", query["query"]):
                names |= metric_names(m.group(1))
                continue
            m = re.fullmatch(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)", query["query"])
            assert m, query
            names.add(m.group(1))
    return names


def test_each_instance_variable_lists_only_its_kind_and_all_is_what_it_lists():
    # `worker --metrics` serves its children's gauges too: under `run`, a worker's provers would
    # be counted with the run's. And "All" as ".*" would match every instance, listed or not.
    # Over the dashboard's whole range, as label_values is (a run gone before its end is listed).
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    run = variables["run"]["query"]["query"]
    assert "max_over_time(damocles_ext_child_state[$__range])" in run
    assert run.endswith(
        "unless on (instance) max_over_time(damocles_ext_worker_manager_reachable[$__range]))"
    )
    assert variables["run"]["refresh"] == 2  # on a change of the time range
    assert variables["run"]["regex"] == '/instance="([^"]+)"/'
    for name in ("run", "coordinator", "worker"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] is None, name


async def test_the_dashboard_names_only_metrics_that_exist(tmp_path):
    # A live supervisor with a child, a live job store, a worker, as their commands serve them.
    families = await live_families(tmp_path)
    exist = series_names(families)
    used = dashboard_metric_names()
    assert used - exist == set()
    # Each query's labels, label values and functions fit its metrics (rate() of no gauge).
    wrong = [f"{panel['title']}: {problem}"
             for panel in json.loads(DASHBOARD.read_text())["panels"]
             for target in panel.get("targets", [])
             for problem in query_problems(target["expr"], families)]  # fmt: skip
    assert wrong == [], "\n".join(wrong)
    # Both halves are on it, so the check above is not vacuous.
    assert {"damocles_ext_requests_total", "damocles_ext_child_state", "damocles_ext_jobs",
            "damocles_ext_worker_leases_lost_total"} <= used  # fmt: skip


def test_each_unit_serves_the_metrics_of_its_dashboard_row_on_a_port_of_its_own():
    # The dashboard has a row, and an instance variable, for each kind: a unit that serves no
    # metrics leaves its row empty. Loopback, as DEPLOY.md says; distinct ports, so that a run
    # and a worker (or a coordinator) on one machine do not collide.
    variables = {v["name"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    ports = {}
    for kind in ("run", "coordinator", "worker"):
        assert kind in variables
        argv = shlex.split(
            unit(SYSTEMD / f"damocles-ext-{kind}.service")["Service"]["ExecStart"][0]
        )
        assert "--metrics" in argv, kind
        host, _, port = argv[argv.index("--metrics") + 1].rpartition(":")
        assert host == "127.0.0.1", kind
        ports[kind] = port
    assert len(set(ports.values())) == 3, ports


def test_the_query_reader_finds_the_metric_names_and_nothing_else():
    expr = (
        "histogram_quantile(0.95, sum by (le, stage) (rate(damocles_ext_request_duration_seconds"
        '_bucket{instance=~"$run", stage="x"}[$__rate_interval]))) / on (job) group_left '
        "process_open_fds offset 5m"
    )
    assert metric_names(expr) == {
        "damocles_ext_request_duration_seconds_bucket",
        "process_open_fds",
    }


def test_per_child_panels_keep_each_machines_children_apart():
    # Child names (window_post#0) repeat on every machine: summed by child alone, the memory of
    # every host's window_post#0 would be one line, and a FATAL child would name no host.
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for grouping in re.findall(r"by \(([^)]*)\)", expr):
                labels = {label.strip() for label in grouping.split(",")}
                assert "child" not in labels or "instance" in labels, (panel["title"], expr)
            if "{{child}}" in target.get("legendFormat", ""):
                assert "{{instance}}" in target["legendFormat"], panel["title"]
