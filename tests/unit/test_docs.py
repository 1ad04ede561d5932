"""Docs that match the code.

The topic tables (edge_agent/protocol.py's docstring, broker_config/README.md) say what `TOPIC_TABLE` says,
and `Topics` builds the topics the table lists. Every repository path a Markdown file names, in backticks or
as a link, exists.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from edge_agent import protocol
from edge_agent.protocol import TOPIC_TABLE, Topics

ROOT = Path(__file__).resolve().parents[2]

# --- the topic tables -------------------------------------------------------------------------------------


def _topic_rows(markdown: str, where: str) -> dict[str, tuple[int, bool]]:
    """{topic below `edgefl/<fleet>/`: (QoS, retained)} from the one table whose header has topic, QoS and
    retained columns."""
    lines = markdown.splitlines()
    header = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|")
                   and {"topic", "qos", "retained"} <= {c.strip().lower() for c in line.split("|")}), None)
    assert header is not None, f"{where}: no table with 'topic', 'QoS' and 'retained' columns"
    cells = [c.strip().lower() for c in lines[header].strip().strip("|").split("|")]
    topic_col, qos_col, retained_col = cells.index("topic"), cells.index("qos"), cells.index("retained")
    rows: dict[str, tuple[int, bool]] = {}
    for line in lines[header + 2:]:
        if not line.lstrip().startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        topic = cells[topic_col].strip("`").removeprefix(protocol.PREFIX_PATTERN + "/")
        assert cells[retained_col] in ("yes", "no"), f"{where}: retained of {topic} is {cells[retained_col]!r}"
        assert topic not in rows, f"{where}: {topic} listed twice"
        rows[topic] = (int(cells[qos_col]), cells[retained_col] == "yes")
    return rows


EXPECTED = {t.topic: (t.qos, t.retained) for t in TOPIC_TABLE}
REGENERATE = ("regenerate it with: .venv/bin/python -c 'from edge_agent.protocol import topic_table_markdown; "
              "print(topic_table_markdown())'")


@pytest.mark.parametrize("where", ["edge_agent/protocol.py docstring", "broker_config/README.md"])
def test_a_topic_table_says_what_protocol_TOPIC_TABLE_says(where: str) -> None:
    text = protocol.__doc__ or "" if where.endswith("docstring") else (ROOT / where).read_text()
    assert _topic_rows(text, where) == EXPECTED, f"{where} disagrees with protocol.TOPIC_TABLE; {REGENERATE}"
    # Not only the same topics and flags: the very table, so message names and payloads agree too.
    assert protocol.topic_table_markdown() in text, f"{where}: {REGENERATE}"


def test_the_table_parser_sees_a_difference() -> None:
    wrong = protocol.topic_table_markdown().replace("| `telemetry/<device>` | 1 |", "| `telemetry/<device>` | 0 |")
    assert _topic_rows(wrong, "probe")["telemetry/<device>"] == (0, False)


def test_Topics_builds_every_topic_of_the_table_and_no_other() -> None:
    topics = Topics("f1")
    for spec in TOPIC_TABLE:
        member = getattr(topics, spec.attr)
        filled = spec.topic.replace("<device>", "dev-1").replace("<round>", "7").replace("<version>", "7")
        args = [a for a, placeholder in (("dev-1", "<device>"), (7, "<round>"), (7, "<version>"))
                if placeholder in spec.topic]
        built = member(*args) if callable(member) else member
        assert built == f"edgefl/f1/{filled}", spec
    # Filters, parsers and `shared` (a filter as a shared subscription) are not topics of their own; every other
    # public member must be in the table.
    builders = {n for n in dir(Topics) if not n.startswith("_") and not n.endswith("_filter")}
    assert builders - {"fleet", "prefix", "device_of", "version_of_delta", "shared"} == {t.attr for t in TOPIC_TABLE}


# --- paths the docs name ----------------------------------------------------------------------------------

# Created at run time or by setup, never in the repository.
RUN_TIME = {".venv", "results", "stress-logs", "build", "dist", "edge_fl.egg-info", ".pytest_cache"}
# Files the docs name that live outside the repository (inside a dependency's wheel or sdist, or the system).
EXTERNAL = {"watch_dataset.npy", "HAPT.pkl.gz", "mosquitto.conf"}
EXTENSIONS = (".py", ".md", ".toml", ".cfg", ".conf", ".tflite", ".json", ".service", ".example", ".sh", ".c",
              ".h", ".txt", ".csv", ".yml", ".yaml", ".ini", ".npz", ".png", ".pem")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_TOKEN = re.compile(r"^[A-Za-z0-9_.\-/]+$")


def _repo_files() -> list[Path]:
    """Every file of the working tree, without hidden, virtual-env and build directories (walked, pruned)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        top_level = Path(dirpath) == ROOT  # bench/results is ours; ./results is the demo's
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("node_modules", "__pycache__")
                       and not d.endswith(".egg-info") and not (top_level and d in RUN_TIME)]
        found += [Path(dirpath) / f for f in filenames]
    return found


REPO_FILES = _repo_files()
REPO_NAMES = {p.name for p in REPO_FILES}


def _markdown_files() -> list[Path]:
    return sorted(p for p in REPO_FILES if p.suffix == ".md")


def _candidates(text: str) -> list[str]:
    """Link targets, and words in code spans, that may be repository paths. In a span of several words (a
    command line) only words with a '/' count: `--model path.tflite` names no file of ours."""
    found = []
    for target in _LINK.findall(text):
        if "://" not in target and not target.startswith(("#", "mailto:")):
            found.append(target.split("#")[0])
    for span in _CODE_SPAN.findall(text):
        words = [w.strip("'\",;:()[]") for w in span.split()]
        found += [w for w in words if w and (len(words) == 1 or "/" in w)]
    return found


def _is_repo_path(word: str, top: set[str]) -> bool:
    if not _TOKEN.match(word) or word.startswith(("/", "-")) or "//" in word:
        return False
    if word.startswith(".") and "/" not in word:
        return False  # `.npz`: a kind of file, not a file
    first = word.split("/")[0]
    if "/" in word:
        return first in top  # `model/current`, `edgefl/#`: topics, not paths
    return word.endswith(EXTENSIONS) and not re.fullmatch(r"[\d.]+", word)


def _missing(md: Path) -> list[str]:
    top = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} | {"docs", ".venv"} | RUN_TIME
    here = {p.name for p in md.parent.iterdir()}
    missing = []
    for word in _candidates(md.read_text()):
        if not _is_repo_path(word, top | here):
            continue
        if word.split("/")[0] in RUN_TIME or Path(word).name in EXTERNAL:
            continue
        rel = word.rstrip("/")
        if not ((ROOT / rel).exists() or (md.parent / rel).exists()
                or ("/" not in rel and rel in REPO_NAMES)):
            missing.append(word)
    return sorted(set(missing))


_DOTTED = re.compile(r"^(edge_agent|firmware_bridge)(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _module_file(parts: list[str]) -> Path | None:
    path = ROOT.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return path / "__init__.py" if (path / "__init__.py").is_file() else None


def _unknown_names(md: Path) -> list[str]:
    """Dotted names (`edge_agent.broker.LocalBroker`) whose module, or whose name in it, does not exist."""
    unknown = []
    words = [w.strip("'\",;:()[]") for span in _CODE_SPAN.findall(md.read_text()) for w in span.split()]
    for word in words:
        if not _DOTTED.match(word):
            continue
        parts = word.split(".")
        cut = next((i for i in range(len(parts), 0, -1) if _module_file(parts[:i]) is not None), 0)
        module = _module_file(parts[:cut]) if cut else None
        if module is None:
            unknown.append(word)
            continue
        source, rest = module.read_text(), parts[cut:]
        defined = not rest or re.search(rf"^(class|def)\s+{rest[0]}\b|^{rest[0]}\s*[:=]|import .*\b{rest[0]}\b",
                                        source, re.M)
        if not defined or any(not re.search(rf"\b{name}\b", source) for name in rest[1:]):
            unknown.append(word)
    return sorted(set(unknown))


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_document_names_exists(md: Path) -> None:
    assert _missing(md) == [], (f"{md.relative_to(ROOT)} names files that do not exist (paths are relative to the "
                                "repository root or to the document's directory)")
    assert _unknown_names(md) == [], f"{md.relative_to(ROOT)} names modules or names the code does not have"


def test_the_path_check_finds_a_missing_file(tmp_path: Path) -> None:
    doc = ROOT / "broker_config" / "README.md"
    text = doc.read_text()
    assert "mosquitto-dev.conf" in text and not _missing(doc)
    probe = doc.parent / "_probe_for_test_docs.md"
    try:
        probe.write_text("See `edge_agent/no_such_module.py`, [a link](no-such.md), `model/current` (a topic), "
                         "`mosquitto-dev.conf` (beside this file), `edge_agent.broker.LocalBroker`, "
                         "`edge_agent.broker.NoSuchBroker` and `python -m edge_agent.no_such`.\n")
        assert _missing(probe) == ["edge_agent/no_such_module.py", "no-such.md"]
        assert _unknown_names(probe) == ["edge_agent.broker.NoSuchBroker", "edge_agent.no_such"]
    finally:
        probe.unlink()
