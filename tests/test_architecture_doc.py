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


def _rooms() -> list[list[str]]:
    """The rooms of the doc's table, bottom to top: each a list of module prefixes."""
    text = DOC.read_text(encoding="utf-8")
    table = text.split("## The rooms", 1)[1].split("\n## ", 1)[0]
    rooms = []
    for line in table.splitlines():
        cells = line.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`idgen/"):
            continue
        paths = re.findall(r"`(idgen/[\w/]+?)(?:\.py)?`", cells[1])
        rooms.append([p.replace("/", ".") for p in paths])
    return rooms


def _room_of(module: str, rooms: list[list[str]]) -> int | None:
    for rank, prefixes in enumerate(rooms):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_lower_rooms_never_import_higher_ones():
    """Every ``import idgen.x`` in the package (module level or inside a function) goes down or
    sideways in the doc's table, never up; every module lives in a room the doc names."""
    import ast

    rooms = _rooms()
    assert len(rooms) >= 10, rooms
    unplaced, upward = [], []
    for path in sorted((ROOT / "idgen").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module == "idgen":
            continue  # the package: CONFIG_DIR and the config resolvers, imported by everyone
        rank = _room_of(module, rooms)
        if rank is None:
            unplaced.append(module)
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                other = _room_of(target, rooms)
                if other is not None and other > rank:
                    upward.append(f"{module} -> {target}")
    assert not unplaced, f"modules in no room of docs/architecture.md: {unplaced}"
    assert not upward, f"imports from a higher room: {upward}"
