"""The documents stay navigable and true: the README links every document under docs/, every
relative link in the Markdown files leads to a file and heading that exist, no text refers to
issue numbers (a reader must not need the tracker), an SQLite URL of a system directory is
absolute, docs/RELIABILITY.md names tests that exist and quotes the chaos run's saved figures,
every option shown with a command exists in its parser, every option of every command is shown
with it, and every ext-prover.cfg shown parses.
The observability contract: the metric tables list every metric exported, with its type and
labels, and no other; the PromQL examples read metrics, labels and label values that exist
(rate() of no gauge); the status document's tables list every field it has, and no other."""

from __future__ import annotations

import argparse
import ast
import functools
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# [text](target#anchor) outside code: (target, anchor), either may be empty.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s#]*)(?:#([^)\s]*))?\)")
# A Markdown heading: its level (the #s) and its text.
HEADING = re.compile(r"^(#+) (.*)$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# "issue 5", "issues #12", "(#981)", "damocles #981"; not a child name such as window_post#10.
ISSUE_REF = re.compile(r"(?i)\bissues? #?\d|(?:^|[\s(\[])#\d{2,}\b", re.MULTILINE)
TEXT_SUFFIXES = {".md", ".py", ".toml", ".example", ".c", ".h", ".cfg", ".txt", ".in"}


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as dashes."""
    text = FENCE.sub("", doc.read_text())
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for _, h in HEADING.findall(text)
    }


def _markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "examples").glob("*/README.md"))
    files.append(ROOT / "native" / "README.md")
    return [f for f in files if f.is_file()]


def _source_files() -> list[Path]:
    if (ROOT / ".git").exists():
        try:
            listed = subprocess.run(
                ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.split()
        except (OSError, subprocess.CalledProcessError):
            listed = None
        if listed is not None:
            return [ROOT / f for f in listed if Path(f).suffix in TEXT_SUFFIXES]
    return [  # an sdist: its files, without the build's
        p
        for p in ROOT.rglob("*")
        if p.suffix in TEXT_SUFFIXES and p.is_file() and ".venv" not in p.parts
        and not any(part.endswith(".egg-info") for part in p.parts)
    ]  # fmt: skip


def test_the_readme_links_every_document_under_docs():
    readme = (ROOT / "README.md").read_text()
    linked = {Path(target) for target, _ in LINK.findall(FENCE.sub("", readme))}
    missing = [
        str(doc.relative_to(ROOT))
        for doc in sorted((ROOT / "docs").glob("*.md"))
        if doc.relative_to(ROOT) not in linked
    ]
    assert missing == [], f"README.md does not link {missing}"


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(doc: Path):
    broken = []
    for target, anchor in LINK.findall(FENCE.sub("", doc.read_text())):
        if "://" in target or target.startswith("mailto:"):
            continue
        place = doc.parent / target if target else doc
        if not place.exists():
            broken.append(target)
        elif anchor and place.suffix == ".md" and anchor not in _anchors(place):
            broken.append(f"{target}#{anchor}")
    assert broken == [], f"{doc.relative_to(ROOT)} links to what does not exist: {broken}"


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: p.name)
def test_every_code_block_is_closed_by_a_fence_line_of_its_own(doc: Path):
    # A closing fence with text after it ("``` A heartbeat ...") is no fence: the block ran on
    # to the next one, and the document's prose after it showed as code.
    problems = []
    opened: int | None = None
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        fence = re.match(r"^\s*```(.*)$", line)
        if fence is None:
            continue
        rest = fence.group(1).strip()
        if opened is None:
            opened = number
            if not re.fullmatch(r"[\w+.-]*", rest):
                problems.append(f"line {number}: an opening fence with {rest!r} after it")
        else:
            opened = None
            if rest:
                problems.append(f"line {number}: a closing fence with {rest!r} after it")
    if opened is not None:
        problems.append(f"line {opened}: a code block never closed")
    assert problems == [], f"{doc.relative_to(ROOT)}: {problems}"


def test_no_text_refers_to_issue_numbers():
    found = []
    for path in _source_files():
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if ISSUE_REF.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert found == [], "say what the issue asked for instead:\n" + "\n".join(found)


# sqlite:/// then a path is relative to the current directory: sqlite:///var/lib/x.db is
# ./var/lib/x.db, so `status --jobs` finds no store there and `coordinator --jobs` would make one.
RELATIVE_SYSTEM_PATH = re.compile(r"sqlite:///(?:var|srv|opt|etc|home|root|mnt|data|run|tmp)/")


def test_sqlite_urls_of_system_directories_are_written_absolute():
    found = []
    for path in [*_markdown_files(), *sorted((ROOT / "deploy").rglob("*.service")),
                 ROOT / "ext-prover.cfg.example"]:  # fmt: skip
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if RELATIVE_SYSTEM_PATH.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert found == [], "an absolute path takes four slashes, sqlite:////var/…:\n" + "\n".join(
        found
    )


# -- the reliability evidence -----------------------------------------------------------------

RELIABILITY = ROOT / "docs" / "RELIABILITY.md"
# `tests/x.py`, `test_x.py::test_name`, `…::test_name` (the file of the reference before it),
# `…::test_prefix_…` (a name that starts so).
TEST_REF = re.compile(r"`((?:tests/|bench/)?[\w/]+\.py|…)(?:::(\w+…?))?`")


# Cached: the evidence names dozens of tests in a few large files, and parsing a file again
# for each of them was most of this module's time.
@functools.cache
def _functions(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree)
    return frozenset(n.name for n in nodes if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))


def test_every_test_the_reliability_evidence_names_exists():
    text = FENCE.sub("", RELIABILITY.read_text())
    wrong, last = [], None
    for line in text.splitlines():
        for file, name in TEST_REF.findall(line):
            if file != "…":
                last = ROOT / file if "/" in file else ROOT / "tests" / file
            where = f"`{file}{'::' + name if name else ''}`"
            if last is None or not last.is_file():
                wrong.append(f"{where}: no file {last}")
                continue
            if name:
                names = _functions(last)
                if name.endswith("…"):
                    found = any(n.startswith(name[:-1]) for n in names)
                else:
                    found = name in names
                if not found:
                    wrong.append(f"{where}: not in {last.relative_to(ROOT)}")
    every_test = set().union(*(_functions(p) for p in (ROOT / "tests").glob("test_*.py")))
    for name in re.findall(r"`(test_\w+)`", text):
        if name not in every_test:
            wrong.append(f"`{name}`: no such test")
    assert wrong == [], "docs/RELIABILITY.md names tests that are not there (a `…::` means the "
    "file of the reference before it):\n" + "\n".join(wrong)


def test_the_last_chaos_runs_figures_are_those_of_its_saved_results():
    run = json.loads((ROOT / "bench" / "results" / "chaos.json").read_text())["results"]
    log, latency, rss = run["supervisor_log"], run["latency_s"], run["rss_mb"]
    actions, once = run["chaos_actions"], run["exactly_once"]
    expected = {
        "requests / answered / with an output": [run["requests"], run["answered"], run["outputs"]],
        "duplicates, missing, answers after their deadline": [
            once["duplicates"], once["missing"], run["late_answers"]
        ],
        "chaos actions": [
            actions["sigkill"], actions["sigstop"], actions["garbage"], actions["grandchild"]
        ],
        "re-dispatches / restarts / failed starts": [
            log["retries (re-dispatches)"], run["restarts"], log["failed starts"]
        ],
        "children killed as hung": [
            log["killed as hung (cancel grace)"], log["killed for breaking the protocol"]
        ],
        "orphans adopted and killed": [log["orphans adopted and killed"]],
        "latency p50 / p99 / max": [latency["p50"], latency["p99"], latency["max"]],
        "throughput under chaos": [run["requests_per_s"]],
        "supervisor RSS": [rss["first_quarter_median"], rss["last_quarter_median"], rss["peak"]],
        "`run` after SIGTERM": [
            run["shutdown"]["returncode"], run["shutdown"]["seconds"], len(run["leftover_processes"])
        ],
    }  # fmt: skip
    section = RELIABILITY.read_text().split("## The last chaos run", 1)[1]
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", section, flags=re.MULTILINE))
    wrong = []
    for label, values in expected.items():
        [cell] = [cell for row, cell in rows.items() if row.startswith(label)]
        shown = re.findall(r"\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?", cell.split("(", 1)[0])
        # Each figure as the JSON has it, rounded to the decimals the table shows.
        as_saved = [
            f"{value:,.{len(s.partition('.')[2])}f}" if "," in s else
            f"{value:.{len(s.partition('.')[2])}f}"
            for s, value in zip(shown, values, strict=False)
        ]  # fmt: skip
        if len(shown) != len(values) or as_saved != shown:
            wrong.append(f"{label}: the table says {shown}, chaos.json {as_saved or values}")
    assert wrong == [], "bench/results/chaos.json and the table disagree:\n" + "\n".join(wrong)


# -- commands shown in the documents -----------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _shown_commands(text: str) -> list[tuple[int, str]]:
    """(line, command) for each command line of a fenced block (continuations joined) and each
    inline code span of the prose: what a reader would type or look up."""
    shown = []
    for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        first = text.count("\n", 0, m.start()) + 2
        for offset, line in enumerate(m.group(1).replace("\\\n", " ").splitlines()):
            shown.append((first + offset, line.split(" # ", 1)[0]))
    prose = FENCE.sub(lambda m: "\n" * m.group().count("\n"), text)
    for m in re.finditer(r"`([^`]+)`", prose):
        shown.append((prose.count("\n", 0, m.start()) + 1, m.group(1)))
    return shown


def test_every_option_a_document_shows_a_command_with_exists_in_its_parser():
    # `damocles-ext <command> [<subcommand>] --option`, or the same without the program's name
    # (`run --deadline-after`), in a fenced block or in the prose. A renamed or dropped option
    # left in a document sends an operator to a usage error.
    from damocles_ext import cli

    commands = _subcommands(cli.build_parser())
    wrong = []
    for doc in _markdown_files():
        for line, shown in _shown_commands(doc.read_text()):
            words = shown.split()
            if words[:1] == ["$"]:
                words = words[1:]
            if words[:1] == ["damocles-ext"]:
                words = words[1:]
            if not words or words[0] not in commands:
                continue
            parsers = [commands[words[0]]]
            subcommands = _subcommands(parsers[0])
            if subcommands:  # `wdpost list`, or `wdpost list/reset --manager`: each named
                named = (
                    [s for s in re.split(r"[/|]", words[1]) if s in subcommands]
                    if len(words) > 1
                    else []
                )
                parsers = [subcommands[s] for s in named] or list(subcommands.values())
            for word in words[1:]:
                option = re.match(r"--[\w-]+", word.strip("[](),.;:`'\""))
                if option is None:
                    continue
                for parser in parsers:
                    if option.group() not in parser._option_string_actions:
                        wrong.append(
                            f"{doc.relative_to(ROOT)}:{line}: `{shown.strip()[:80]}`:"
                            f" {parser.prog} has no {option.group()}"
                        )
    assert wrong == [], "\n".join(wrong)


def test_every_ext_prover_cfg_a_document_shows_parses():
    # A ```toml block of [[WdPost]]/[[WinPost]]/... tables is an ext-prover.cfg a reader copies:
    # a key renamed or a value tightened since must not leave one the parser refuses.
    from damocles_ext.config import STAGE_OF_TABLE, ConfigError, parse_config

    wrong, seen = [], 0
    for doc in _markdown_files():
        text = doc.read_text()
        for m in re.finditer(r"^```toml\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
            tables = set(re.findall(r"^\[\[?([\w.]+)", m.group(1), flags=re.MULTILINE))
            if not tables or not tables <= set(STAGE_OF_TABLE) | {
                f"{t}.{sub}" for t in STAGE_OF_TABLE for sub in ("Envs", "PluginOptions")
            }:
                continue  # damocles-worker.toml, sector-manager.cfg, pyproject.toml
            seen += 1
            where = f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            try:
                parse_config(m.group(1), where, tmp_root="/run/damocles-ext")
            except ConfigError as exc:
                wrong.append(str(exc))
    assert seen >= 5 and wrong == [], "\n".join(wrong)


# -- the observability contract: what dashboards and alerts are built on --------------------------

METRIC_DOCS = ("OBSERVABILITY.md", "SECTORS.md")
# | `damocles_ext_name` | type | label, label | meaning |
METRIC_ROW = re.compile(r"^\| `(damocles_ext_\w+)` \| (\w+) \| ?([\w, ]*?) ?\|", re.MULTILINE)


def _documented_metrics() -> dict[str, tuple[str, set[str]]]:
    rows: dict[str, tuple[str, set[str]]] = {}
    for name in METRIC_DOCS:
        for m in METRIC_ROW.finditer((ROOT / "docs" / name).read_text()):
            labels = {label.strip() for label in m.group(3).split(",") if label.strip()}
            assert rows.setdefault(m.group(1), (m.group(2), labels)) == (m.group(2), labels)
    return rows


async def test_every_metric_exported_is_in_a_table_with_its_type_and_labels_and_no_other(
    tmp_path,
):
    # The tables are what an operator builds dashboards and alerts on: a metric renamed, a label
    # added or a type changed must change them too, and a table row must name a real metric.
    from helpers.promql import exported, live_families

    real = {
        name: e
        for name, e in exported(await live_families(tmp_path)).items()
        if name.startswith("damocles_ext_")
    }
    documented = _documented_metrics()
    wrong = [f"{name} ({e.type}) is in no table of {METRIC_DOCS}"
             for name, e in real.items() if name not in documented]  # fmt: skip
    wrong += [f"{name} is in a table but not exported" for name in documented if name not in real]
    for name, e in real.items():
        if name in documented and documented[name] != (e.type, e.labels):
            wrong.append(f"{name}: documented {documented[name]}, exported {(e.type, e.labels)}")
        # Prometheus' naming: a counter ends in _total, nothing else does; a unit is a suffix.
        if (e.type == "counter") != name.endswith("_total"):
            wrong.append(f"{name}: a {e.type}")
        unit = name.removesuffix("_total")
        for word in ("seconds", "bytes"):
            if word in name.split("_") and not unit.endswith(f"_{word}"):
                wrong.append(f"{name}: its unit ({word}) is not its suffix")
    assert len(real) >= 40 and wrong == [], "\n".join(wrong)


async def test_every_query_the_documents_show_reads_metrics_labels_and_values_that_exist(tmp_path):
    # The ```promql examples are copied into alert rules: a metric, a label or a label value
    # that does not exist makes an alert that never fires, and rate() of a gauge means nothing.
    from helpers.promql import live_families, query_problems

    families = await live_families(tmp_path)
    wrong, seen = [], 0
    for doc in _markdown_files():
        text = doc.read_text()
        for block in re.finditer(r"^```promql\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
            first = text.count("\n", 0, block.start()) + 2
            for i, line in enumerate(block.group(1).splitlines()):
                if line.strip() and not line.lstrip().startswith("#"):
                    seen += 1
                    where = f"{doc.relative_to(ROOT)}:{first + i}"
                    wrong += [f"{where}: {p}" for p in query_problems(line, families)]
    assert seen >= 10 and wrong == [], "\n".join(wrong)


def test_the_query_checker_finds_a_wrong_label_value_and_rate_of_a_gauge():
    from helpers.promql import Exported, query_problems

    class Family:  # as prometheus_client gives them
        def __init__(self, name, type, samples):
            self.name, self.type, self.samples = name, type, samples

    class Sample:
        def __init__(self, name, labels):
            self.name, self.labels = name, labels

    families = [
        Family("dext_a", "counter", [Sample("dext_a_total", {"outcome": "ok"})]),
        Family("dext_b", "gauge", [Sample("dext_b", {})]),
    ]
    assert query_problems('increase(dext_a_total{outcome="ok"}[1h])', families) == []
    assert query_problems('sum by (outcome) (rate(dext_a_total{outcome=~"ok|eror"}[5m]))',
                          families) == ["dext_a_total{outcome} is never 'eror' (only ['ok'])"]  # fmt: skip
    assert query_problems("rate(dext_b[5m])", families) == ["rate() of dext_b, a gauge"]
    assert query_problems('dext_b{stage="x"}', families) == [
        "dext_b has no label 'stage' (it has ['instance', 'job'])"
    ]
    assert query_problems("sum by (stage) (dext_b) + dext_c", families) == [
        "dext_c: no such metric",
        "by (stage): no metric of the query has that label",
    ]
    assert Exported("gauge").labels == set()


def _status_fields(section: str) -> list[str]:
    """The field names of a STATUS.md table: the first cell's `names` of each row."""
    return [
        f
        for row in re.findall(r"^\| (`[^|]*`) \|", section, re.MULTILINE)
        for f in re.findall(r"`([a-z_]+)`", row)
    ]


async def test_every_field_of_the_status_document_is_in_its_table_and_no_other():
    # `status --json` is a versioned contract (fields may be added, never renamed or removed):
    # each field a reader gets is described, under its object's heading, and each described
    # field is one the document has.
    import msgspec

    from damocles_ext.jobs.worker_status import WorkerJobStatus, WorkerPart
    from damocles_ext.sectors.locator import SectorLocator
    from damocles_ext.status import ChildStatus, StageStatus, StatusDocument, SupervisorStatus

    text = (ROOT / "docs" / "STATUS.md").read_text()
    sections = dict(re.findall(r"^## ([^\n]*)\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL))
    worker, jobs = sections["`worker`"].split("Each of `jobs[]`")
    tables = {
        StatusDocument: text.split("\n## ", 1)[0],
        SupervisorStatus: sections["`supervisor`"],
        ChildStatus: sections["`children[]`"].split("`lock_files`: ", 1)[0],
        StageStatus: sections["`stages[]`"],
        WorkerPart: worker,
        WorkerJobStatus: jobs,
    }
    fields = {
        struct.__name__: [f.name for f in msgspec.structs.fields(struct)] for struct in tables
    }
    sections_of = {struct.__name__: section for struct, section in tables.items()}
    async with SectorLocator([]) as locator:  # `worker --proxy`'s `sectors`
        fields["SectorLocator.status()"] = list(locator.status())
    sections_of["SectorLocator.status()"] = sections["`sectors`"]
    wrong = []
    for name, real in fields.items():
        documented = _status_fields(sections_of[name])
        wrong += [f"{name}.{f} is not documented" for f in real if f not in documented]
        wrong += [f"{name} has no {f}" for f in documented if f not in real]
    assert len(fields) == 7 and wrong == [], "\n".join(wrong)


def test_every_policy_name_the_docs_give_simulate_is_one_it_takes():
    # SIMULATION.md's list of policies ("**ref**" there was refused by `simulate --policies
    # ref`: its name is `reference`), and each `--policies` command line a document shows (the
    # tables call the reference `ref`: a list copied from them must run too).
    from damocles_ext.scheduling.sim_engine import resolve_policies

    text = (ROOT / "docs" / "SIMULATION.md").read_text()
    listed = text.split("Policies, same draws:", 1)[1].split("\n\n", 1)[0]
    names = re.findall(r"^- (?:Two yardsticks[^*]*)?\*\*([\w-]+)\*\*", listed, re.MULTILINE)
    names += re.findall(r"\) and \*\*([\w-]+)\*\*", listed)
    assert len(names) == 8, names
    lists = {
        (doc.name, found)
        for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for found in re.findall(r"--policies[ =]([\w,-]+)", doc.read_text())
    }
    assert ("SIMULATION.md", "a,b,c,cl,cs,reference,clairvoyant") in lists, lists
    wrong = []
    for name, found in [("SIMULATION.md's list", ",".join(names)), *sorted(lists)]:
        try:
            resolve_policies(found.split(","))
        except ValueError as exc:
            wrong.append(f"{name}: --policies {found}: {exc}")
    assert wrong == [], "\n".join(wrong)
    assert resolve_policies(["ref"]) == ["reference"]


# Options no document needs to show (internal ones), each with its reason:
# {("sectors create", "--option"): "why"}. None so far.
UNDOCUMENTED_OPTIONS: dict[tuple[str, str], str] = {}


def _command_parsers(
    parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(the command's words, its parser) for the program, each command and each subcommand."""
    found = [(words, parser)]
    for name, sub in _subcommands(parser).items():
        if sub.prog.split()[-1] == name:  # once each (an alias' prog is its first name's)
            found += _command_parsers(sub, (*words, name))
    return found


def _words_name(words: list[str], command: tuple[str, ...]) -> bool:
    """`words` (a command line shown, or a heading's code span) start with `command`, the
    program's name before it or not; the program itself (no command): `damocles-ext --option`."""
    if words[:1] == ["$"]:
        words = words[1:]
    if not command:
        return words[:1] == ["damocles-ext"] and words[1:2] != [] and words[1].startswith("--")
    if words[:1] == ["damocles-ext"]:
        words = words[1:]
    return tuple(words[: len(command)]) == command


def _documented_options(command: tuple[str, ...]) -> set[str]:
    """The options a document shows with `command`: in a command line of it (a line of a fenced
    block or an inline code span that starts with the command, `damocles-ext` before it or
    not), or in the first cell of a table row in a section whose heading names the command in
    a code span (`` ## `worker`'s options ``; the section ends at the next heading of its level
    or above)."""
    found: set[str] = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for _line, shown in _shown_commands(text):
            words = shown.split()
            if _words_name(words, command):
                found.update(re.findall(r"--[\w-]+", " ".join(words[1:])))
        level = 0  # of the heading naming the command whose section this is; 0: none
        for line in FENCE.sub(lambda m: "\n" * m.group().count("\n"), text).splitlines():
            heading = HEADING.match(line)
            if heading is not None:
                depth = len(heading.group(1))
                if level and depth <= level:
                    level = 0
                spans = re.findall(r"`([^`]+)`", heading.group(2))
                if not level and any(_words_name(s.split(), command) for s in spans):
                    level = depth
            elif level and line.startswith("|"):
                found.update(re.findall(r"--[\w-]+", line.split("|")[1]))
    return found


def test_every_option_of_every_command_is_shown_with_its_command_in_a_document():
    # The converse of the test above: an option an operator can find only in `--help` is one
    # they never learn of. Each long option of each (sub)command is in a command line of it,
    # or in an options table under a heading naming it, in the README or a docs/*.md.
    from damocles_ext import cli

    missing = []
    for command, parser in _command_parsers(cli.build_parser()):
        documented = _documented_options(command)
        name = " ".join(command)
        for action in parser._actions:
            for option in action.option_strings:
                if (
                    option.startswith("--")
                    and option != "--help"
                    and (name, option) not in UNDOCUMENTED_OPTIONS
                    and option not in documented
                ):
                    missing.append(f"damocles-ext {name} {option}".replace("  ", " "))
    assert missing == [], "shown with their command in no document:\n" + "\n".join(missing)
