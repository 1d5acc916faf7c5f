"""The documentation stays true: every link in README.md, bench/README.md and docs/*.md resolves (files in
the repository, anchors against the target's headings by GitHub's slug rules; external URLs are only
checked to be well-formed, never fetched), no page mentions a Markdown file the repository lacks, and the
README's CLI table names exactly the commands of the Typer app, with options they really take."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import typer

from cirrus.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --- reading Markdown ------------------------------------------------------------------------------------

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _blank(text: str) -> str:
    """Text of the same length and line breaks with nothing in it: masking keeps offsets and line numbers."""
    return re.sub(r"[^\n]", " ", text)


def _mask_fences(text: str) -> str:
    """Blank out fenced code blocks and HTML comments (code and hidden notes, not links)."""
    text = re.sub(r"<!--.*?-->", lambda match: _blank(match.group()), text, flags=re.DOTALL)
    out: list[str] = []
    fence: str | None = None
    for line in text.splitlines(keepends=True):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            out.append(_blank(line))
        elif fence is not None:
            closing = _FENCE.match(line)
            if closing and closing.group(1)[0] == fence[0] and len(closing.group(1)) >= len(fence):
                fence = None if not line.strip().strip(fence[0]) else fence  # a closing fence has no info string
            out.append(_blank(line))
        else:
            out.append(line)
    return "".join(out)


def _mask_code_spans(text: str) -> str:
    """Blank out inline code spans (a run of n backticks up to the next run of exactly n, within a paragraph)."""
    out: list[str] = []
    for block in re.split(r"(\n[ \t]*\n)", text):
        pos = 0
        for opener in re.finditer(r"(?<!`)`+(?!`)", block):
            if opener.start() < pos:
                continue
            ticks = opener.group()
            closer = re.compile(rf"(?<!`){ticks}(?!`)").search(block, opener.end())
            if closer is None:
                continue
            out.append(block[pos : opener.start()])
            out.append(_blank(block[opener.start() : closer.end()]))
            pos = closer.end()
        out.append(block[pos:])
    return "".join(out)


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


_INLINE_LINK = re.compile(
    r"!?\[(?P<text>(?:[^\[\]\\]|\\.|\[(?:[^\[\]\\]|\\.)*\])*)\]"
    r"\(\s*(?P<target><[^<>\n]*>|(?:[^\s()\\]|\\.|\((?:[^\s()\\]|\\.)*\))*)"
    r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^()]*\)))?\s*\)"
)
_REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[(?P<label>[^\]]+)\]:[ \t]*(?P<target><[^<>\n]*>|\S+)", re.MULTILINE)
_FULL_REFERENCE = re.compile(r"(?<![\]\\])!?\[(?:[^\[\]\\]|\\.)+\]\[(?P<label>(?:[^\[\]\\]|\\.)*)\]")
_AUTOLINK = re.compile(r"<(?P<target>[A-Za-z][A-Za-z0-9+.-]{1,31}:[^<>\s]*)>")
_HTML_ATTRIBUTE = re.compile(r"<(?:a|img|source)\b[^>]*?\b(?:href|src)\s*=\s*[\"'](?P<target>[^\"']*)[\"']", re.I)


@dataclass(frozen=True)
class Link:
    doc: Path
    line: int
    target: str

    def where(self) -> str:
        return f"{_rel(self.doc)}:{self.line}"


def _normalize_label(label: str) -> str:
    return " ".join(label.split()).casefold()


def _links(doc: Path, text: str) -> tuple[list[Link], list[str]]:
    """The links of one page, and problems found while reading them (undefined references)."""
    masked = _mask_code_spans(_mask_fences(text))
    links: list[Link] = []
    problems: list[str] = []
    definitions: set[str] = set()
    for match in _REFERENCE_DEFINITION.finditer(masked):
        definitions.add(_normalize_label(match.group("label")))
        links.append(Link(doc, _line_of(masked, match.start("target")), match.group("target").strip("<>")))
    for match in _INLINE_LINK.finditer(masked):
        links.append(Link(doc, _line_of(masked, match.start("target")), match.group("target").strip("<>")))
    for match in _FULL_REFERENCE.finditer(masked):
        label = match.group("label") or match.group().split("][")[0].lstrip("!").lstrip("[")
        if _normalize_label(label) not in definitions:
            problems.append(f"{_rel(doc)}:{_line_of(masked, match.start())}: reference [{label}] is not defined")
    for pattern in (_AUTOLINK, _HTML_ATTRIBUTE):
        for match in pattern.finditer(masked):
            links.append(Link(doc, _line_of(masked, match.start("target")), match.group("target")))
    return links, problems


# --- GitHub's heading anchors ----------------------------------------------------------------------------


def _heading_text(markdown: str) -> str:
    """What GitHub renders of a heading's inline Markdown: the text its anchor is made from."""
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", markdown)  # images: their alt text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"\[([^\]]*)\]\[[^\]]*\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"(`+)(.+?)\1", r"\2", text)  # code spans: their content
    text = re.sub(r"\*+|(?<![\w\\])_+|_+(?!\w)", "", text)  # emphasis delimiters
    return re.sub(r"\\(.)", r"\1", text)  # backslash escapes


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading (github-slugger): lower case, drop everything but letters, marks,
    numbers, `_`, `-` and spaces, and make each space a `-`."""
    text = _heading_text(heading).strip().lower()
    kept = "".join(
        c for c in text if c in " -" or unicodedata.category(c) == "Pc" or unicodedata.category(c)[0] in "LMN"
    )
    return kept.replace(" ", "-")


def _anchors_in(text: str) -> set[str]:
    """Every anchor GitHub makes in a Markdown page: headings (ATX and setext; a repeated slug gets -1, -2,
    ...) and explicit HTML `id` / `name` attributes."""
    lines = _mask_fences(text).splitlines()
    headings: list[str] = []
    for index, line in enumerate(lines):
        atx = re.match(r"^ {0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$", line)
        if atx:
            headings.append(atx.group(1) or "")
            continue
        if index > 0 and re.match(r"^ {0,3}(=+|-+)[ \t]*$", line):
            above = lines[index - 1]
            if above.strip() and not re.match(r"^ {0,3}(#|>|[-*+] |\d+[.)] |\||```|~~~)", above):
                headings.append(above.strip())
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in headings:
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    anchors.update(re.findall(r"<[^>]+\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", text))
    return anchors


@functools.cache
def _anchors_of(path: Path) -> frozenset[str]:
    return frozenset(_anchors_in(path.read_text(encoding="utf-8")))


# --- checking one link -----------------------------------------------------------------------------------

_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.I)


def _external_problem(target: str) -> str | None:
    """Why an external URL is malformed, or None. It is never fetched."""
    if any(c.isspace() for c in target):
        return "contains whitespace"
    try:
        parts = urlsplit(target)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as error:
        return f"is malformed ({error})"
    scheme = parts.scheme.lower()
    if scheme == "mailto":
        return None if re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", parts.path) else "is not an e-mail address"
    if scheme not in ("http", "https"):
        return f"has scheme {parts.scheme!r}: only http(s), mailto and relative paths are expected"
    host = parts.hostname or ""
    if not host:
        return "has no host"
    if ":" in host:  # an IPv6 literal: urlsplit has accepted its brackets
        return None
    if not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
        return f"has an invalid host {host!r}"
    return None


def _link_problem(link: Link) -> str | None:
    """Why a link does not resolve, or None."""
    target = link.target
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target):
        problem = _external_problem(target)
        return None if problem is None else f"{target} {problem}"
    if target.startswith("//"):
        return f"{target} is protocol-relative: write https://"
    if not target:
        return "the link has no target"
    path_part, _, fragment = target.partition("#")
    path_part = path_part.split("?", 1)[0]
    if path_part:
        decoded = unquote(path_part)
        base = ROOT if decoded.startswith("/") else link.doc.parent
        resolved = (base / decoded.lstrip("/")).resolve()
        if not resolved.is_relative_to(ROOT):
            return f"{target} points outside the repository"
        if not resolved.exists():
            return f"{target}: {_rel(resolved)} does not exist"
    else:
        resolved = link.doc
    if not fragment:
        return None
    anchor = unquote(fragment)
    if resolved.is_dir():
        readme = resolved / "README.md"
        if not readme.is_file():
            return f"{target}: a directory without a README.md has no anchor #{anchor}"
        resolved = readme
    if resolved.suffix.lower() not in (".md", ".markdown"):
        if re.fullmatch(r"L\d+(?:C\d+)?(?:-L\d+(?:C\d+)?)?", anchor):
            return None  # GitHub's line anchors in a source file
        return f"{target}: #{anchor} is not a line anchor and {_rel(resolved)} is not Markdown"
    if anchor not in _anchors_of(resolved):
        return f"{target}: {_rel(resolved)} has no heading with the anchor #{anchor}"
    return None


def _doc_problems(doc: Path) -> list[str]:
    links, problems = _links(doc, doc.read_text(encoding="utf-8"))
    for link in links:
        problem = _link_problem(link)
        if problem is not None:
            problems.append(f"{link.where()}: {problem}")
    return problems


_MARKDOWN_MENTION = re.compile(r"(?<![\w./\\-])(?P<path>(?:\.{0,2}/)?(?:[\w.-]+/)*[\w-]+\.md)\b")


def _mention_problems(doc: Path) -> list[str]:
    """Prose (code spans included) that names a Markdown file the repository does not have: a reader
    cannot follow `DESIGN.md` to anywhere."""
    text = _mask_fences(doc.read_text(encoding="utf-8"))
    text = re.sub(r"\b[a-z][a-z0-9+.-]*://[^\s)>\]`\"']*", _blank_match, text, flags=re.I)  # URLs
    problems = []
    for match in _MARKDOWN_MENTION.finditer(text):
        mentioned = match.group("path")
        candidates = [doc.parent / mentioned, ROOT / mentioned.lstrip("/")]
        if not any(candidate.resolve().is_relative_to(ROOT) and candidate.exists() for candidate in candidates):
            where = f"{_rel(doc)}:{_line_of(text, match.start())}"
            problems.append(f"{where}: mentions {mentioned}, which is not in the repository")
    return problems


def _blank_match(match: re.Match[str]) -> str:
    return _blank(match.group())


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_link_resolves(doc: Path) -> None:
    problems = _doc_problems(doc)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_markdown_file_mentioned_exists(doc: Path) -> None:
    problems = _mention_problems(doc)
    assert not problems, "\n".join(problems)


# --- the checker itself, on pages written here -----------------------------------------------------------


def test_github_slugs() -> None:
    assert github_slug("The spec (`cirrus.yaml`)") == "the-spec-cirrusyaml"
    assert github_slug("Canaries and traffic splitting") == "canaries-and-traffic-splitting"
    assert github_slug("Realtime overhead: Cirrus vs FastAPI (no-op)") == "realtime-overhead-cirrus-vs-fastapi-no-op"
    assert github_slug("**Bold** and [a link](x.md) and snake_case") == "bold-and-a-link-and-snake_case"
    assert github_slug("Cold start -> first response") == "cold-start---first-response"
    assert github_slug("Größe über alles") == "größe-über-alles"
    text = "# Title\n\n## Usage\n\n```\n# not a heading\n```\n\n## Usage\n\nSetext\n------\n<a id='custom'></a>\n"
    assert _anchors_in(text) == {"title", "usage", "usage-1", "setext", "custom"}


def test_checker_names_each_broken_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Set up\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "\n".join(
            [
                "# Home",  # 1
                "[ok](docs/guide.md#set-up) [ok too](./docs/guide.md) [here](#home) [`code`](docs)",  # 2
                "[gone](DESIGN.md) and [bad anchor](docs/guide.md#setup)",  # 3
                "`[not a link](nowhere.md)` and <https://example.com/a?b=c>",  # 4
                "```",  # 5
                "[in a fence](nowhere.md)",  # 6
                "```",  # 7
                "[bad url](http://exa_mple.com) [no host](https:///x) [out](../outside.md)",  # 8
                "[undefined][ref] and [defined][ok]",  # 9
                "<!-- [hidden](nowhere.md) -->",  # 10
                "[ok]: docs/guide.md",  # 11
            ]
        ),
        encoding="utf-8",
    )
    problems = _doc_problems(page)
    assert [problem.split(": ", 1)[0] for problem in problems] == ["README.md:9"] + ["README.md:3"] * 2 + [
        "README.md:8"
    ] * 3
    assert "DESIGN.md does not exist" in problems[1]
    assert "no heading with the anchor #setup" in problems[2]
    mentions = _mention_problems(page)
    assert [m.split(": ", 1)[1] for m in mentions] == [
        "mentions DESIGN.md, which is not in the repository",
        "mentions nowhere.md, which is not in the repository",
        "mentions ../outside.md, which is not in the repository",
    ]


# --- the README's CLI table and the Typer app ------------------------------------------------------------

Command = Any  # a click command as Typer builds it (Typer ships its own copy of click's classes)


def _command_tree() -> Command:
    return typer.main.get_command(app)


def _subcommands(command: Command) -> dict[str, Command]:
    return dict(getattr(command, "commands", None) or {})


def _leaf_commands(command: Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    subcommands = _subcommands(command)
    if not subcommands and path:
        yield path
    for name, sub in subcommands.items():
        if not getattr(sub, "hidden", False):
            yield from _leaf_commands(sub, (*path, name))


def _option_names(command: Command) -> set[str]:
    names: set[str] = {"--help"}
    for param in command.params:
        if getattr(param, "param_type_name", "") == "option":
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


@dataclass
class CliRow:
    line: int
    usages: list[str]  # the code spans of the first cell, `\|` unescaped
    description_spans: list[str]


def _split_cells(row: str) -> list[str]:
    row = row.strip()
    row = row.removeprefix("|")
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row)]


def _code_spans(cell: str) -> list[str]:
    return [span.replace("\\|", "|").strip() for _, span in re.findall(r"(`+)(.+?)\1", cell)]


def _cli_table(readme: Path) -> list[CliRow]:
    lines = readme.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"##\s+CLI\s*", line))
    rows: list[CliRow] = []
    for number, line in enumerate(lines[start + 1 :], start=start + 2):
        if line.startswith("#"):
            break
        if not line.lstrip().startswith("|"):
            if rows:
                break
            continue
        cells = _split_cells(line)
        if re.fullmatch(r"[\s|:-]*", line) or cells[0].lower() == "command":
            continue  # the header and its delimiter row
        rows.append(CliRow(number, _code_spans(cells[0]), [s for c in cells[1:] for s in _code_spans(c)]))
    assert rows, f"README.md: no table under '## CLI' (from line {start + 1})"
    return rows


def _options_named(usage: str) -> list[str]:
    return re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", usage)


def _resolve(tokens: list[str], group: Command, group_path: tuple[str, ...]) -> tuple[tuple[str, ...], Command, str]:
    """Follow the tokens down the command tree from a group: the command's path, the command, and the
    rest of the usage."""
    path, command = group_path, group
    while tokens and tokens[0] in _subcommands(command):
        command = _subcommands(command)[tokens[0]]
        path = (*path, tokens.pop(0))
    return path, command, " ".join(tokens)


def _check_cli_table() -> tuple[set[tuple[str, ...]], list[str]]:
    """The commands the README's CLI table names, and what in it does not match the app."""
    root = _command_tree()
    named: set[tuple[str, ...]] = set()
    problems: list[str] = []
    for row in _cli_table(ROOT / "README.md"):
        where = f"README.md:{row.line}"
        row_commands: list[Command] = []
        group_path: tuple[str, ...] | None = None
        for usage in row.usages:
            tokens = usage.split()
            if tokens[:1] == ["cirrus"]:
                path, command, rest = _resolve(tokens[1:], root, ())
                if not path:
                    problems.append(f"{where}: `{usage}` names no command of the CLI ({' '.join(tokens[:2])})")
                    continue
            elif group_path is not None:  # `cirrus keys create ...` / `list`: a sibling in the same group
                path, command, rest = _resolve(tokens, _subcommand_at(root, group_path), group_path)
                if path == group_path:
                    problems.append(f"{where}: `{usage}` names no sub-command of `cirrus {' '.join(group_path)}`")
                    continue
            else:
                problems.append(f"{where}: `{usage}` does not start with `cirrus`")
                continue
            if _subcommands(command):
                problems.append(
                    f"{where}: `{usage}` names the group `cirrus {' '.join(path)}`, not one of its commands"
                )
                continue
            named.add(path)
            row_commands.append(command)
            group_path = path[:-1] if len(path) > 1 else None
            for option in _options_named(rest):
                if option not in _option_names(command):
                    problems.append(f"{where}: `cirrus {' '.join(path)}` has no option {option}")
        for span in row.description_spans:
            tokens = span.split()
            if tokens[:1] == ["cirrus"]:  # a reference to a command, e.g. `cirrus up --admin-host`
                path, command, rest = _resolve(tokens[1:], root, ())
                if not path or _subcommands(command):
                    problems.append(f"{where}: `{span}` names no command of the CLI")
                    continue
                missing = [o for o in _options_named(rest) if o not in _option_names(command)]
                problems += [f"{where}: `cirrus {' '.join(path)}` has no option {o}" for o in missing]
            elif re.fullmatch(r"--?[A-Za-z][\w-]*(?:\s.*)?", span) and row_commands:
                option = span.split()[0]
                if not any(option in _option_names(command) for command in row_commands):
                    problems.append(f"{where}: `{option}` is not an option of this row's command")
    return named, problems


def _subcommand_at(root: Command, path: tuple[str, ...]) -> Command:
    command = root
    for name in path:
        command = _subcommands(command)[name]
    return command


def test_cli_table_rows_name_real_commands_and_options() -> None:
    _, problems = _check_cli_table()
    assert not problems, "the README's CLI table does not match the CLI:\n" + "\n".join(problems)


def test_cli_table_names_every_command() -> None:
    named, _ = _check_cli_table()
    missing = [" ".join(path) for path in _leaf_commands(_command_tree()) if path not in named]
    assert not missing, "the README's CLI table (## CLI) has no row for: " + ", ".join(
        f"`cirrus {name}`" for name in missing
    )


def test_cli_checker_names_stale_rows_and_unknown_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "README.md").write_text(
        "\n".join(
            [
                "## CLI",  # 1
                "",  # 2
                "| command | what it does |",  # 3
                "| --- | --- |",  # 4
                "| `cirrus up` / `cirrus down` | start / stop; see `cirrus up --no-such-flag` |",  # 5
                "| `cirrus keys create [--api NAME] [--colour C]` / `list` / `rename ID` | keys |",  # 6
                "| `cirrus launch API` | gone |",  # 7
                "| `cirrus predict API '<json>' \\| @file [-H 'K: V'] [-Z]` | `-f` follows |",  # 8
                "",
                "## Next",
                "| `cirrus ghost` | not in the CLI section |",
            ]
        ),
        encoding="utf-8",
    )
    named, problems = _check_cli_table()
    assert named == {("up",), ("down",), ("keys", "create"), ("keys", "list"), ("predict",)}
    assert problems == [
        "README.md:5: `cirrus up` has no option --no-such-flag",
        "README.md:6: `cirrus keys create` has no option --colour",
        "README.md:6: `rename ID` names no sub-command of `cirrus keys`",
        "README.md:7: `cirrus launch API` names no command of the CLI (cirrus launch)",
        "README.md:8: `cirrus predict` has no option -Z",
        "README.md:8: `-f` is not an option of this row's command",
    ]
