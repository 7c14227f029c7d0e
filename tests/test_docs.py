"""The documentation points at things that exist: every relative link of README.md and docs/*.md resolves (file and
#anchor), every command of their bash blocks names a program of this tree (a script, a module, a Makefile target, a
console script, an install extra) and the project files it reads (a study file...), and the README's Python blocks
parse."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# shell words and other tools' programs that are not programs of this project
SHELL = {"cd", "source", "export", "rm", "mkdir", "ls", "cat", "echo", "git", "apt-get", "npm", "sudo", "img2dataset"}
# an argument naming a file of this tree that the command reads (outputs such as docs/images/*.png are not checked)
PROJECT_FILE = re.compile(r"^(studies|eval|training|scripts|bench|diffclip)/[\w./-]+\.(json|py|sh|txt)$")


def _prose(text: str) -> str:
    """The text without its fenced code blocks (links in code are not links)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(page.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links():
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            yield pytest.param(page, target, id=f"{page.relative_to(ROOT)}->{target}")


@pytest.mark.parametrize("page, target", list(_links()))
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{page.relative_to(ROOT)}: link {target!r}: {dest} does not exist"
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), f"{page.relative_to(ROOT)}: link {target!r}: no heading #{anchor} in {dest.name}"


def test_every_page_is_linked_from_the_readme():
    readme = _prose((ROOT / "README.md").read_text())
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def _blocks(lang: str, pages=(ROOT / "README.md",)) -> list[str]:
    return [body for page in pages for kind, body in FENCE.findall(page.read_text()) if kind == lang]


def _commands(block: str):
    """Each simple command of a bash block, as a list of words (comments, continuations and VAR=value dropped)."""
    text = block.replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for w in [*words, ";"]:
            if w in (";", "&&", "||", "|"):
                while command and re.match(r"^\w+=", command[0]):
                    command.pop(0)
                if command:
                    yield command
                command = []
            else:
                command.append(w)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))


def _problem(words: list[str]) -> str | None:
    """Why this command names something that does not exist here (None when all it names exists)."""
    missing = [a for a in words[1:] if PROJECT_FILE.match(a) and not (ROOT / a).is_file()]
    if missing:
        return f"no file {missing[0]}"
    prog, args = Path(words[0]).name, words[1:]
    if prog in ("nice", "srun"):  # launchers: the command they start is checked (srun's own flags first)
        while args and args[0].startswith("-"):
            args = args[1:]
        return _problem(args) if args else None
    if prog in SHELL:
        return None
    if prog in ("python", "python3"):
        if args[:1] == ["-m"]:
            module = args[1]
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:  # a parent package that does not exist
                found = False
            return None if found else f"no module {module}"
        if args[:1] == ["-c"]:
            return None
        return None if (ROOT / args[0]).is_file() else f"no file {args[0]}"
    if prog == "torchrun":
        scripts = [a for a in args if a.endswith(".py")]
        if not scripts:
            return "torchrun without a script"
        return None if (ROOT / scripts[0]).is_file() else f"no file {scripts[0]}"
    if prog == "make":
        missing = [t for t in args if not t.startswith("-") and t not in _make_targets()]
        return f"no Makefile target {missing}" if missing else None
    if prog in ("pip", "pip3"):
        extras = set(_pyproject()["project"].get("optional-dependencies", {}))
        for arg in args:
            for name in re.findall(r"\[([\w,\s-]+)\]", arg):
                missing = [e.strip() for e in name.split(",") if e.strip() not in extras]
                if missing:
                    return f"no install extra {missing} in pyproject.toml"
        return None
    if prog in _pyproject()["project"].get("scripts", {}):
        return None
    if "/" in words[0]:
        path = ROOT / words[0]
        return None if path.is_file() else f"no file {words[0]}"
    return f"unknown program {words[0]!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_name_programs_that_exist(page):
    blocks = _blocks("bash", [page])
    if page.name == "README.md":
        assert blocks, "README.md has no bash block"
    problems = [f"{' '.join(c)[:80]}: {p}" for block in blocks for c in _commands(block) if (p := _problem(c))]
    assert not problems, f"{page.name}: commands naming what is not in this tree:\n" + "\n".join(problems)


def test_the_command_check_catches_a_missing_program():
    assert _problem(["python", "eval/no_such_program.py"]) == "no file eval/no_such_program.py"
    assert _problem(["torchrun", "--nproc_per_node", "2", "training/main.py"]) is None
    assert _problem(["make", "no-such-target"]).startswith("no Makefile target")
    assert _problem(["python", "-m", "diffclip.no_such_module"]) == "no module diffclip.no_such_module"
    assert _problem(["python", "training/study.py", "studies/no_such_study.json"]).startswith("no file studies/")
    assert _problem(["frobnicate", "x"]).startswith("unknown program")


def test_readme_names_the_two_commands():
    words = [c for block in _blocks("bash") for c in _commands(block)]
    assert ["make", "demo"] in words and ["make", "test"] in words


def test_readme_python_blocks_parse():
    blocks = _blocks("python")
    assert blocks, "README.md has no python block"
    for block in blocks:
        ast.parse(block)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
