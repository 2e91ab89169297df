"""The documentation against the code: config keys, links, and the commands the README shows.

README.md is the front door; the reference lives in docs/, one page per topic. These tests fail when a
config key is added without a line in docs/configuration.md, when a docs page is not reachable from the
README, when a relative link (or its #anchor) points nowhere, and when a command shown in a code block is
not one the CLI has.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
MARKDOWN = [README, *PAGES]

_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_VERB = re.compile(r"(?<![\w./-])hpcvid\s+([a-z][\w-]*)")
_SYNOPSIS = re.compile(r"[\[\]|]|\.\.\.|…")


def _split(text: str) -> tuple[str, list[str]]:
    """(the prose with code blocks removed, the code blocks' texts)."""
    prose, blocks, current = [], [], None
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
            continue
        (prose if current is None else current).append(line)
    assert current is None, "an unclosed code block"
    return "\n".join(prose), blocks


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link in a heading keeps its text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    prose, _ = _split(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors = set()
    for line in prose.splitlines():
        match = _HEADING.match(line)
        if match:
            slug = _slug(match.group(2))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path) -> list[str]:
    prose, _ = _split(path.read_text(encoding="utf-8"))
    prose = re.sub(r"`[^`]*`", "", prose)                      # inline code is not a link
    return _LINK.findall(prose)


def _relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)   # http:, https:, mailto: ...


# ----------------------------------------------------------------------------------------- (a) config keys
def test_every_config_key_is_documented_in_configuration_md():
    from hpcvid.config import Config, _SECTION_CLASSES

    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    keys = [f.name for f in dataclasses.fields(Config) if f.name not in _SECTION_CLASSES]
    keys += [f"{section}.{f.name}" for section, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)]
    sections = {f.name for f in dataclasses.fields(Config)} - set(keys)
    assert sections == set(_SECTION_CLASSES), "a section of Config is not in the section table"
    missing = [key for key in keys if f"`{key}`" not in text]
    assert not missing, f"config keys not documented in docs/configuration.md: {', '.join(missing)}"
    for section in _SECTION_CLASSES:
        assert f"`[{section}]`" in text, f"docs/configuration.md has no heading for [{section}]"


def test_the_key_check_sees_a_key_that_is_not_documented():
    """The check above must be able to fail: a made-up key is not found."""
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert "`extract.shards`" in text and "`extract.not_a_key`" not in text


# ----------------------------------------------------------------------------------------- (b) reachability
def test_docs_exist_and_every_page_is_linked_from_the_readme():
    assert PAGES, "docs/ holds no page"
    linked = {(README.parent / unquote(t.split("#", 1)[0])).resolve() for t in _links(README)
              if _relative(t) and t.split("#", 1)[0]}
    unlinked = [p.name for p in PAGES if p.resolve() not in linked]
    assert not unlinked, f"docs pages not linked from README.md: {', '.join(unlinked)}"


# ----------------------------------------------------------------------------------------- (c) links
@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_that_exists(path):
    broken = []
    for target in _links(path):
        if not _relative(target):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / unquote(file_part)).resolve() if file_part else path.resolve()
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in _anchors(destination):
            broken.append(f"{target} (no heading #{anchor} in {destination.name})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {'; '.join(broken)}"


# ----------------------------------------------------------------------------------------- (d) commands
def _code_blocks(path: Path) -> list[str]:
    return _split(path.read_text(encoding="utf-8"))[1]


def test_readme_shows_the_two_commands_first():
    text = README.read_text(encoding="utf-8")
    first = text.split("\n## ", 2)[1]
    assert first.startswith("The two commands")
    assert "make demo" in first and "make test" in first


def test_every_hpcvid_verb_in_a_readme_code_block_exists():
    from hpcvid.cli import VERBS

    shown = {verb for block in _code_blocks(README) for verb in _VERB.findall(block)}
    assert shown, "README.md shows no hpcvid command in a code block"
    unknown = sorted(shown - set(VERBS))
    assert not unknown, f"README.md shows verbs the CLI does not have: {', '.join(unknown)}"


def _command_lines(path: Path) -> list[list[str]]:
    """The arguments after `hpcvid` of every command line in the code blocks (comments dropped)."""
    commands = []
    for block in _code_blocks(path):
        for line in block.splitlines():
            line = re.sub(r"^\s*\$\s+", "", line)
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue                                   # not shell (e.g. Python, JSON)
            if "hpcvid" in words:
                commands.append(words[words.index("hpcvid") + 1:])
    return commands


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_hpcvid_command_shown_parses(path):
    """Each `hpcvid ...` line of a code block parses with the real parser (verb, stage and flags);
    a synopsis line (with [optional] parts, a|b choices or ...) is checked up to its stage only."""
    from hpcvid.cli import build_parser
    from hpcvid.errors import HpcvidError
    from hpcvid.stages import STAGES

    parser = build_parser()
    problems = []
    for argv in _command_lines(path):
        shown = " ".join(["hpcvid", *argv])
        if any(_SYNOPSIS.search(word) for word in argv):
            verb = argv[0] if argv else ""
            stage = argv[1] if len(argv) > 1 else ""
            if verb in ("run", "submit", "mpi") and stage not in STAGES and stage != "pipeline":
                problems.append(f"{shown}: unknown stage {stage!r}")
            continue
        try:
            parser.parse_args(argv)
        except (HpcvidError, SystemExit) as error:
            problems.append(f"{shown}: {error}")
    assert not problems, "\n".join(problems)


def test_the_command_check_sees_a_verb_that_does_not_exist():
    """The checks above must be able to fail: a verb the CLI does not have is refused."""
    from hpcvid.cli import VERBS, build_parser
    from hpcvid.errors import HpcvidError

    assert "classify" not in VERBS
    with pytest.raises(HpcvidError):
        build_parser().parse_args(["classify", "--run", "work/x/runs/lstm", "clips/"])
