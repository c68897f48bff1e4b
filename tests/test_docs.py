"""The documentation stands alone and matches the code.

* The README, docs/ and every user-facing string of qe (string literals of its sources, the
  text files it ships, `qe plugins` and every `--help`) name only files the repository holds:
  no Markdown file or `../…` path that does not exist, and every relative link or anchor in
  the Markdown resolves.
* Every `qe …` command line of the README parses with the real parser (`qe.cli.build_parser`),
  without running it, and `--help` works for every command it documents.
* docs/cli.md documents every option of every command, and its `--help` blocks are current
  (`scripts/cli_reference.py`).
* The plugin examples of the README and docs/plugins.md register and run.
"""

from __future__ import annotations

import ast
import functools
import importlib
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "kernels" / "README.md", ROOT / "reports" / "README.md",
               *(ROOT / "docs").glob("*.md")])
QE_SOURCES = sorted(p for p in (ROOT / "qe").rglob("*") if p.suffix in (".py", ".json", ".html", ".toml"))

# A path-like token: letters, digits and . _ - / (a Markdown link target or a name in prose).
_MD_PATH = re.compile(r"(?<![\w./-])([\w.-]+(?:/[\w.-]+)*\.md)\b")
_PARENT = re.compile(r"(?<![\w.])((?:\.\./)+[\w.-][\w./-]*)")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.S | re.M)
_TOP_LEVEL_DIRS = ("qe/", "kernels/", "benchmarks/", "tests/", "scripts/", "docs/")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@functools.lru_cache(maxsize=1)
def _md_basenames() -> frozenset[str]:
    """Names of the repository's Markdown files (build outputs and environments left out)."""
    names = set()
    for _folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("node_modules", "build", "dist")
                   and not d.endswith(".egg-info")]
        names.update(f for f in files if f.endswith(".md"))
    return frozenset(names)


def _exists(target: str, base: Path) -> bool:
    """``target`` exists relative to ``base`` or to the repository root, inside the repository."""
    for start in (base, ROOT):
        p = (start / target).resolve()
        if p.exists() and (p == ROOT or ROOT in p.parents):
            return True
    return False


def outside_references(text: str, base: Path) -> list[str]:
    """Paths named in ``text`` that the repository does not hold (``base``: the naming file's folder)."""
    bad = []
    names = _md_basenames()
    for m in _MD_PATH.finditer(text):
        target = m.group(1)
        if "/" in target:
            if not _exists(target, base):
                bad.append(target)
        elif target not in names:
            bad.append(target)
    for m in _PARENT.finditer(text):
        target = m.group(1).rstrip(".")
        if not _exists(target, base):
            bad.append(target)
    return sorted(set(bad))


# --------------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize("text", [
    "see notes/METHOD-NOTES.md §5", "as in METHOD-NOTES.md", "the protocol of PEERS.md", "STYLE.md conventions",
    "the figures in ../notes/peers.json",
    "[method](../outside/method.md)", "read ../notes.txt first", "docs/nothing-here.md",
])
def test_checker_flags_outside_files(text):
    assert outside_references(text, ROOT)


@pytest.mark.parametrize("text", [
    "docs/method.md, routing", "see [the protocol](docs/protocol.md#text-protocol)", "README.md",
    "results.md is written by qe compare", "kernels/README.md",
])
def test_checker_accepts_repository_files(text):
    assert outside_references(text, ROOT) == []


# --------------------------------------------------------------------------- Markdown


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_~]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_markdown_names_only_repository_files(doc):
    bad = outside_references(doc.read_text(), doc.parent)
    assert not bad, f"{_rel(doc)} names files the repository does not hold: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_markdown_links_and_anchors_resolve(doc):
    bad = []
    for m in _LINK.finditer(_FENCE.sub("", doc.read_text())):
        target = m.group(1)
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists() or ROOT not in file.parents:
            bad.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            bad.append(target)
    assert not bad, f"{_rel(doc)}: links that do not resolve: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_markdown_repository_paths_exist(doc):
    """Every `qe/…`, `benchmarks/…`, `tests/…` path in backticks names a file or folder that exists."""
    bad = []
    for m in re.finditer(r"`([^`\s]+)`", doc.read_text()):
        token = m.group(1).rstrip(".,:;")
        if not token.startswith(_TOP_LEVEL_DIRS) or any(c in token for c in "<>*{}[]$"):
            continue
        if not (ROOT / token).exists():
            bad.append(token)
    assert not bad, f"{_rel(doc)} names paths that do not exist: {bad}"


# --------------------------------------------------------------------------- user-facing strings


def _string_literals(path: Path) -> list[str]:
    if path.suffix != ".py":
        return [path.read_text()]
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            out.append("".join(v.value for v in node.values if isinstance(v, ast.Constant)))
    return out


@pytest.mark.parametrize("source", QE_SOURCES, ids=_rel)
def test_qe_strings_name_only_repository_files(source):
    bad = sorted({b for s in _string_literals(source) for b in outside_references(s, source.parent)})
    assert not bad, f"{_rel(source)}: string literals name files the repository does not hold: {bad}"


def _cli_output(argv: list[str], capsys) -> str:
    from qe.cli import main

    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), f"qe {' '.join(argv)} exited with {e.code}"
    out = capsys.readouterr()
    return out.out + out.err


def _commands() -> list[str]:
    import argparse

    from qe.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_plugins_and_help_name_only_repository_files(capsys):
    texts = {"qe plugins": _cli_output(["plugins"], capsys), "qe --help": _cli_output(["--help"], capsys)}
    for cmd in _commands():
        texts[f"qe {cmd} --help"] = _cli_output([cmd, "--help"], capsys)
    for name, text in texts.items():
        assert text.strip(), f"{name} printed nothing"
        bad = outside_references(text, ROOT)
        assert not bad, f"`{name}` names files the repository does not hold: {bad}"


# --------------------------------------------------------------------------- README commands


def readme_command_lines() -> list[str]:
    """Every `qe …` command line of the README: in shell code blocks and in inline code."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for lang, body in _FENCE.findall(text):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in body.splitlines():
            lines.extend(part.strip() for part in line.removeprefix("$ ").split("&&"))
    prose = _FENCE.sub("", text)
    lines.extend(m.group(1) for m in re.finditer(r"`([^`]+)`", prose))
    commands = []
    for line in lines:
        if re.match(r"^(\.venv/bin/)?qe \w+:", line):  # a command's output ("qe compare: 12 cells ...")
            continue
        if line.startswith(("qe ", ".venv/bin/qe ")) or line in ("qe", ".venv/bin/qe"):
            commands.append(line)  # a line that does not split fails in test_readme_command_parses
    return commands


def _argv(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)[1:]
    except ValueError:  # unbalanced quotes
        return ["<unbalanced quotes>"]


def test_readme_has_the_two_commands_first():
    text = (ROOT / "README.md").read_text()
    blocks = _FENCE.findall(text)
    assert [b[1].strip() for b in blocks[:2]] == [
        "bash scripts/setup.sh && .venv/bin/qe analyze", "bash scripts/setup.sh && .venv/bin/pytest"]


def test_readme_documents_commands():
    lines = readme_command_lines()
    assert len(lines) >= 5, lines
    documented = {_argv(line)[0] for line in lines if _argv(line)}
    assert {"analyze", "quantize", "eval", "compare"} <= documented


@pytest.mark.parametrize("line", readme_command_lines())
def test_readme_command_parses(line):
    from qe.cli import build_parser

    argv = _argv(line)
    if argv in ([], ["--help"], ["--version"]):
        return
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"README command does not parse ({e.code}): {line}")
    assert args.command == argv[0]


def test_readme_commands_have_help(capsys):
    from qe.cli import build_parser

    for cmd in sorted({_argv(line)[0] for line in readme_command_lines() if _argv(line)}):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0
        assert f"usage: qe {cmd}" in capsys.readouterr().out


# --------------------------------------------------------------------------- docs/cli.md


def test_cli_reference_documents_every_option():
    import argparse

    from qe.cli import build_parser

    text = (ROOT / "docs" / "cli.md").read_text()
    prose = re.sub(r"<!-- help:(\S+) -->.*?<!-- /help:\1 -->", "", text, flags=re.S)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for cmd, parser in sub.choices.items():
        if f"## qe {cmd}" not in text:
            missing.append(f"section `qe {cmd}`")
        for action in parser._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help" and f"`{opt}" not in prose:
                    missing.append(f"qe {cmd} {opt}")
    assert not missing, f"docs/cli.md does not explain: {sorted(set(missing))}"


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="argparse formats help differently from 3.13 on")
def test_cli_reference_help_blocks_are_current(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    cli_reference = importlib.import_module("cli_reference")
    doc = (ROOT / "docs" / "cli.md").read_text()
    assert cli_reference.render(doc, cli_reference.help_texts()) == doc, (
        "docs/cli.md: --help blocks are out of date; run .venv/bin/python scripts/cli_reference.py")


# --------------------------------------------------------------------------- plugin examples


def _example_packages(tmp_path: Path) -> dict[str, Path]:
    """The `# NAME_pkg/__init__.py` code blocks of the README and docs/plugins.md, written out."""
    out = {}
    for doc in (ROOT / "README.md", ROOT / "docs" / "plugins.md"):
        for lang, body in _FENCE.findall(doc.read_text()):
            m = re.match(r"# (\w+)/__init__\.py", body)
            if lang == "python" and m:
                pkg = tmp_path / f"{doc.stem.lower()}_{m.group(1)}" / m.group(1)
                pkg.mkdir(parents=True)
                (pkg / "__init__.py").write_text(body)
                out[f"{doc.stem}:{m.group(1)}"] = pkg.parent
    return out


def test_plugin_examples_register_and_run(tmp_path, monkeypatch):
    import torch

    from qe.compensators.base import CompensatorModule, LayerContext, LayerPlan
    from qe.plugins import KINDS, QEPluginManager
    from qe.quantizers.grid import quantize_rtn
    from qe.settings import parse_setting

    packages = _example_packages(tmp_path)
    assert {"README:meancomp_pkg", "plugins:meancomp_pkg"} <= set(packages), sorted(packages)
    kinds_seen = set()
    for key, folder in packages.items():
        name = key.partition(":")[2]
        monkeypatch.syspath_prepend(str(folder))
        sys.modules.pop(name, None)
        module = importlib.import_module(name)
        manager = QEPluginManager(load_entry_points=False, extra_plugins=[module])
        for kind, hook in KINDS.items():
            if hasattr(module, hook):
                kinds_seen.add(kind)
                for cls in getattr(module, hook)():
                    assert manager.entries(kind)[cls.name].cls is cls
        if hasattr(module, "qe_compensators"):
            (cls,) = module.qe_compensators()
            W, X = torch.randn(8, 16), torch.randn(40, 16) + 1
            layer = LayerContext(name="l", block_index=0, weight=W, bias=None, setting=parse_setting("W4A8"),
                                 stats=None, tokens=X)
            fitted = manager.create("compensator", cls.name).fit(layer, quantize_rtn(W, 4, 0, True), LayerPlan())
            assert isinstance(fitted, CompensatorModule) and type(fitted) in cls.modules
            rebuilt = type(fitted).from_layout(fitted.layout())
            rebuilt.load_state_dict(fitted.state_dict())
            assert torch.equal(rebuilt(X), fitted(X)) and fitted(X).shape == (40, 8)
        sys.modules.pop(name, None)
    assert {"estimator", "transform", "quantizer", "compensator", "model_adapter", "calibration_source"} <= kinds_seen
