"""Point every code link in docs/WALKTHROUGH.md at the line that now defines its name.

    python tests/update_walkthrough_links.py

test_15 in tests/test_walkthrough.py fails when code moves; this rewrites the `#Lnn` anchors.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[`([\w.]+)`\]\(\.\./(nanopipe/[\w/]+\.py)#L(\d+)\)")


def fix(match):
    name, path, line = match.groups()
    last = name.split(".")[-1]
    defines = re.compile(rf"\s*(def|class) {last}\b|{last} = ")
    lines = (ROOT / path).read_text().splitlines()
    found = [i + 1 for i, text in enumerate(lines) if defines.match(text)]
    new = str(found[0]) if found and int(line) not in found else line
    return f"[`{name}`](../{path}#L{new})"


if __name__ == "__main__":
    doc = ROOT / "docs" / "WALKTHROUGH.md"
    doc.write_text(LINK.sub(fix, doc.read_text()))
