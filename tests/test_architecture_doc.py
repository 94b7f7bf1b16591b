"""docs/architecture.md stays true: the files and folders it names exist, README links it, and
no file of the project points to a document users do not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


def test_named_paths_exist():
    text = DOC.read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:idgen|conf)/[\w./*]+?)`", text))
    assert len(named) > 15  # the page names the rooms and configs it describes
    missing = [p for p in sorted(named) if "*" not in p and not (ROOT / p).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_readme_links_it():
    assert "(docs/architecture.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_no_reference_to_documents_users_do_not_have():
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    me = Path(__file__).relative_to(ROOT).as_posix()
    bad = [
        f
        for f in files
        if f != me
        and (ROOT / f).is_file()
        and f.endswith((".py", ".md", ".yaml", ".toml", ".txt", "Makefile"))
        and re.search(r"DESIGN\.md|DESIGN §|\.\./shared/", (ROOT / f).read_text(errors="ignore"))
    ]
    assert not bad, f"these files cite a document users do not have: {bad}"
