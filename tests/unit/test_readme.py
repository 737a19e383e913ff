"""The README is a user guide that stays true: short, no commit ids, links that resolve, and every command, module,
make target and config key it (or docs/) names exists in the code as it is."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]

MAX_LINES = 250
# a commit id as git prints it: 7 to 40 hex digits, with at least one digit and one letter (so words such as
# "deadbeef" or "added", and plain numbers such as "2026120", are not taken for one)
HEX = re.compile(r"\b[0-9a-f]{7,40}\b")
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _ids(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _code(text: str) -> list[str]:
    """The fenced blocks and inline code spans of a Markdown text (where commands are written)."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    return blocks + INLINE_CODE.findall(prose)


def commit_like(text: str) -> list[str]:
    return [t for t in HEX.findall(text) if re.search(r"[0-9]", t) and re.search(r"[a-f]", t)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, code ticks and punctuation dropped, spaces to hyphens."""
    s = heading.strip().lower().replace("`", "")
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", _text(page))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def test_commit_like_finds_ids_and_leaves_words_and_numbers():
    assert commit_like("the bench at 71c4011, reverted (e890123)") == ["71c4011", "e890123"]
    assert commit_like("deadbeef added faced 2026120 1000000 2,249.8 s") == []


def test_slug_is_githubs():
    assert slug("Commits, exactly-once and resume") == "commits-exactly-once-and-resume"
    assert slug("What configs/cpu-fast.yaml changes") == "what-configscpu-fastyaml-changes"
    assert slug("`whisper-batch report`") == "whisper-batch-report"


def test_readme_is_at_most_250_lines():
    n = len(_text(README).splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; move detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=_ids)
def test_no_commit_ids(page):
    found = commit_like(_text(page))
    assert not found, f"{_ids(page)} names commit ids {found}: date the figures instead (git log -1 --format=%ad)"


@pytest.mark.parametrize("page", PAGES, ids=_ids)
def test_relative_links_resolve(page):
    text = FENCE.sub("", _text(page))
    links = [(label, target) for label, target in LINK.findall(text)
             if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not checked here
    if page == README:
        assert links, "README.md links to nothing"
    broken = []
    for label, target in links:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"[{label}]({target}): no file "
                          f"{dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"[{label}]({target}): no heading #{anchor} in {dest.name}")
    assert not broken, broken


def _module_exists(name: str) -> bool:
    if name.startswith("benchmarks."):  # run from a checkout, not installed
        parts = name.split(".")
        return (REPO.joinpath(*parts).with_suffix(".py")).is_file() or (REPO.joinpath(*parts) / "__init__.py").is_file()
    return importlib.util.find_spec(name) is not None


def _modules(text: str) -> set[str]:
    named = set(re.findall(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)", text))
    named |= {f"benchmarks.{m}" for m in re.findall(r"\bbenchmarks\.([A-Za-z_]\w*)", text)}
    return {m for m in named if not m.split(".")[-1].isupper()}  # `benchmarks.X`: a placeholder


@pytest.mark.parametrize("page", PAGES, ids=_ids)
def test_named_modules_exist(page):
    modules = _modules(_text(page))
    if page == README:
        assert "benchmarks.bench" in modules
    missing = sorted(m for m in modules if not _module_exists(m))
    assert not missing, f"{_ids(page)} names modules that do not exist: {missing}"


def _subcommands(text: str) -> set[tuple[str, ...]]:
    """(subcommand,) or (group, subcommand) for every `whisper-batch ...` written as code."""
    named = set()
    for code in _code(text):
        for m in re.finditer(r"(?<![\w/-])whisper-batch[ \t]+(?:\\\n\s*)?([a-z][\w-]*)(?:\s+([a-z][\w-]*))?", code):
            named.add((m.group(1), m.group(2)) if m.group(1) == "jobs" else (m.group(1),))
    return named


@pytest.mark.parametrize("page", PAGES, ids=_ids)
def test_named_subcommands_exist(page):
    import click

    from whisper_batch.jobs.cli import main

    assert isinstance(main, click.Group)
    named = _subcommands(_text(page))
    if page == README:
        assert {("transcribe",), ("run",), ("status",), ("submit",)} <= named
    unknown = []
    for name in sorted(named, key=str):
        command = main.commands.get(name[0])
        if command is None:
            unknown.append(" ".join(name))
        elif len(name) == 2 and (not isinstance(command, click.Group) or name[1] not in command.commands):
            unknown.append(" ".join(name))
    assert not unknown, f"{_ids(page)} names whisper-batch subcommands the CLI lacks: {unknown} " \
                        f"(it has {sorted(main.commands)})"


def test_named_make_targets_exist():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", makefile, re.M))
    named = set()
    for page in PAGES:
        for code in _code(_text(page)):
            named |= set(re.findall(r"(?<![\w-])make\s+([a-z][\w-]*)", code))
    assert {"demo", "test"} <= named
    assert named <= targets, f"make targets named but not in the Makefile: {sorted(named - targets)}"


# config keys written as code: `decode.beam_size`, `--set ray.model_actors=4`, `model.quantize: int8`; not file names
# (`model.bin`) nor module paths (`model.search.first_argmax`)
_FILE_SUFFIXES = {"bin", "pt", "py", "json", "yaml", "safetensors", "jsonl", "parquet"}


@pytest.mark.parametrize("page", PAGES, ids=_ids)
def test_named_config_keys_exist(page):
    from whisper_batch.pipeline.config import SECTIONS

    pattern = re.compile(rf"(?<![\w./-])({'|'.join(SECTIONS)})\.([a-z_]+)(?![\w./(])")
    named = {(s, f) for code in _code(_text(page)) for s, f in pattern.findall(code) if f not in _FILE_SUFFIXES}
    if page == README:
        assert ("decode", "beam_size") in named
    unknown = sorted(f"{s}.{f}" for s, f in named
                     if f not in {field.name for field in dataclasses.fields(SECTIONS[s])})
    assert not unknown, f"{_ids(page)} names config keys that do not exist: {unknown}"
