"""Refresh the `--help` blocks of docs/cli.md from the real parser (qe.cli.build_parser).

    .venv/bin/python scripts/cli_reference.py          # rewrite the blocks in place
    .venv/bin/python scripts/cli_reference.py --check  # exit 1 if a block is out of date

Each block sits between ``<!-- help:COMMAND -->`` and ``<!-- /help:COMMAND -->`` (``qe`` for
the top level); the prose around the blocks is written by hand.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def help_texts() -> dict[str, str]:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width: fix it
    from qe.cli import build_parser

    parser = build_parser()
    texts = {"qe": parser.format_help()}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in sub.choices.items():
        texts[name] = sp.format_help()
    return texts


def render(doc: str, texts: dict[str, str]) -> str:
    for name, text in texts.items():
        block = f"<!-- help:{name} -->\n```text\n$ qe {'' if name == 'qe' else name + ' '}--help\n{text.rstrip()}\n```\n<!-- /help:{name} -->"
        pattern = re.compile(rf"<!-- help:{re.escape(name)} -->.*?<!-- /help:{re.escape(name)} -->", re.S)
        if not pattern.search(doc):
            raise SystemExit(f"docs/cli.md has no block for `{name}`: add <!-- help:{name} --> <!-- /help:{name} -->")
        doc = pattern.sub(lambda _m, b=block: b, doc)
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that the blocks are current")
    args = ap.parse_args()
    doc = DOC.read_text()
    new = render(doc, help_texts())
    if args.check:
        if new != doc:
            print("docs/cli.md: --help blocks are out of date; run .venv/bin/python scripts/cli_reference.py")
            return 1
        return 0
    DOC.write_text(new)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
