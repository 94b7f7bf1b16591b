"""Docs are tests: every command shown in README.md, experiments/**/*.md and the config headers.

Commands are found automatically (fenced shell blocks, inline code spans that start with a
command, ``#   <command>`` lines at the top of idgen/conf/**/*.yaml), so new docs are covered without
editing this file. Each one is checked the cheapest way that still fails when the doc is wrong:

- ``idgen-train|sample|eval|3d`` and ``python -m idgen.<entry point>``: every override must parse
  with Hydra's grammar (what broke the old sweep recipe), then the config must compose and
  resolve as ``--cfg job`` would (unknown keys, groups or options fail). Sweeps (``a,b``)
  compose at each value; ``a|b|c`` in prose is one command per alternative.
- ``python -m <module>`` / ``python <script>.py``: the module or file exists, and every
  ``--flag`` shown is defined by its argument parser.
- ``make <target>``: the target exists in the Makefile.

The recipes that are cheap on the tiny preset also *run* (``test_documented_guidance_grid_runs``,
``test_documented_sweep_summary_runs``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from idgen import CONFIG_DIR
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {  # console script -> (module, primary config)
    "idgen-train": ("idgen.train", "train"),
    "idgen-sample": ("idgen.sample", "sample"),
    "idgen-eval": ("idgen.evaluate", "eval"),
    "idgen-3d": ("idgen.text_to_3d", "3d"),
}
MODULE_CONFIG = {module: config for module, config in ENTRY_POINTS.values()}
PLACEHOLDER = "/tmp/idgen-docs/placeholder"  # stands for <...> and $VARS when composing


@dataclass(frozen=True)
class Command:
    source: str  # file:line
    text: str

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


# ------------------------------------------------------------------------------ extraction


def _doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "experiments").rglob("*.md"))]
    return [f for f in files if f.is_file()]


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for n, line in lines:
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line.strip())
        else:
            pending = (n, line.strip())
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1].rstrip())
            continue
        out.append(pending)
        pending = None
    if pending is not None:
        out.append(pending)
    return out


_STARTS = re.compile(r"^(idgen-(train|sample|eval|3d)|python3? |make )")


def _split_shell(line: str) -> list[str]:
    """Simple commands of one shell line (``a && b; c``), loop keywords dropped."""
    parts = re.split(r"\s*(?:&&|;)\s*", line)
    out = []
    for part in parts:
        part = part.strip()
        if not part or part.startswith("#") or part in ("do", "done", "fi", "then"):
            continue
        if part.startswith(("for ", "do ", "export ", "cd ", "hf ", "pip ", "git ")):
            part = part.removeprefix("do ").strip() if part.startswith("do ") else ""
        # leading VAR=value assignments (HF_HUB_OFFLINE=1 python -m ...)
        part = re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+", "", part)
        if _STARTS.match(part):
            out.append(part)
    return out


def commands_in_markdown(path: Path) -> list[Command]:
    rel = path.relative_to(ROOT).as_posix()
    lines = path.read_text().splitlines()
    found: list[Command] = []
    fence: str | None = None
    block: list[tuple[int, str]] = []
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence = stripped[3:].strip().lower()
                block = []
            else:
                if fence in ("", "bash", "sh", "shell", "console"):
                    for start, logical in _join_continuations(block):
                        logical = logical.split(" # ")[0].split("  #")[0]
                        found += [Command(f"{rel}:{start}", c) for c in _split_shell(logical)]
                fence = None
            continue
        if fence is not None:
            block.append((n, line))
            continue
        # inline code spans in prose
        for span in re.findall(r"`([^`]+)`", line):
            if _STARTS.match(span.strip()):
                found += [Command(f"{rel}:{n}", c) for c in _split_shell(span.strip())]
    return found


def commands_in_config_headers() -> list[Command]:
    found: list[Command] = []
    for path in sorted(Path(CONFIG_DIR).rglob("*.yaml")):
        rel = path.relative_to(ROOT).as_posix()
        lines = path.read_text().splitlines()
        header = []
        for n, line in enumerate(lines, 1):
            if not line.startswith("#"):
                break
            header.append((n, line))
        picked, in_command = [], False
        for n, line in header:
            body = line[1:]
            if re.match(r"^\s{2,}(idgen-|python3? )", body):
                picked.append((n, body.strip()))
                in_command = body.rstrip().endswith("\\")
            elif in_command:
                picked.append((n, body.strip()))
                in_command = body.rstrip().endswith("\\")
        for start, logical in _join_continuations(picked):
            logical = re.split(r"\s{2,}[(#]", logical)[0]  # trailing "(note)" or "# note"
            found += [Command(f"{rel}:{start}", c) for c in _split_shell(logical)]
    return found


@functools.cache
def all_commands() -> list[Command]:
    found: list[Command] = []
    for f in _doc_files():
        found += commands_in_markdown(f)
    found += commands_in_config_headers()
    return found


# ------------------------------------------------------------------------------ checking


def _tokens(text: str) -> list[str]:
    text = re.sub(r"\$\{[^}]*\}|\$[A-Za-z_]\w*", PLACEHOLDER, text)
    text = re.sub(r"<[^<>]*>", PLACEHOLDER, text)
    return [t for t in shlex.split(text, comments=True) if t not in ("...", "…")]


def _hydra_overrides(args: list[str]) -> list[str]:
    """Command-line args minus Hydra's flags; ``[opt=val]`` (optional, in prose) unwrapped."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun", "--info", "--resolve"):
            continue
        if arg in ("--cfg", "-c", "--package", "-p"):
            skip = True
            continue
        if arg.startswith("[") and arg.endswith("]") and "=" in arg:
            arg = arg[1:-1]
        out.append(arg)
    return out


def _expand(overrides: list[str]) -> list[list[str]]:
    """``a|b|c`` alternatives (prose) -> one override list per alternative."""
    variants = [[]]
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and "|" in value and not value.startswith(("'", '"', "[")):
            variants = [v + [f"{key}={alt}"] for v in variants for alt in value.split("|")]
        else:
            variants = [v + [o] for v in variants]
    return variants


def _at_one_value(parsed) -> str:
    """A sweep override (``k=a,b``, ``interval(a, b)``) as a plain override at its first value."""
    if not parsed.is_sweep_override():
        return parsed.input_line
    key = parsed.get_key_element()
    if parsed.is_interval_sweep():
        return f"{key}={parsed.value().start}"
    return f"{key}={next(iter(parsed.sweep_string_iterator()))}"


def compose_documented(config: str, overrides: list[str], tmp_path: Path) -> None:
    try:
        from idgen.utils.task import accept_null_groups  # `group=null` as idgen-* accept it
    except ImportError:  # pragma: no cover
        accept_null_groups = None
    if accept_null_groups is not None:
        overrides = accept_null_groups(["prog", *overrides], CONFIG_DIR)[1:]
    parsed = OverridesParser.create().parse_overrides(overrides)  # the CLI's grammar
    cfg = compose_config(config, tmp_path, [_at_one_value(p) for p in parsed])
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(job, resolve=True, throw_on_missing=False)


def _source_of(argv: tuple[str, ...]) -> str:
    """Source text of ``python -m module`` (its ``__main__`` for packages) or of a script."""
    if argv[0] == "-m":
        spec = importlib.util.find_spec(argv[1])
        origin = Path(spec.origin)
        if origin.name == "__init__.py" and (origin.parent / "__main__.py").is_file():
            origin = origin.parent / "__main__.py"
        return origin.read_text()
    return (ROOT / argv[0]).read_text()


@functools.cache
def _help_text(argv: tuple[str, ...]) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, *argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, f"`{' '.join(argv)} --help` failed:\n{out.stderr[-2000:]}"
    return out.stdout


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+):", text, flags=re.M))


def check_command(cmd: Command, tmp_path: Path) -> None:
    tokens = _tokens(cmd.text)
    head = tokens[0]
    if head == "make":
        missing = [t for t in tokens[1:] if "=" not in t and t not in _makefile_targets()]
        assert not missing, f"{cmd}: no Makefile target {missing}"
        return
    if head in ENTRY_POINTS:
        module, config = ENTRY_POINTS[head]
        args = tokens[1:]
    elif head.startswith("python"):
        if tokens[1] == "-m":
            module, args = tokens[2], tokens[3:]
            assert importlib.util.find_spec(module) is not None, f"{cmd}: no module {module}"
            config = MODULE_CONFIG.get(module)
            if config is None:
                _check_flags(cmd, ("-m", module), args)
                return
        else:
            script = ROOT / tokens[1]
            assert script.is_file(), f"{cmd}: no file {tokens[1]}"
            _check_flags(cmd, (tokens[1],), tokens[2:])
            return
    else:  # pragma: no cover - _STARTS admits nothing else
        raise AssertionError(f"{cmd}: unknown command")
    for variant in _expand(_hydra_overrides(args)):
        try:
            compose_documented(config, variant, tmp_path)
        except Exception as err:
            raise AssertionError(f"{cmd}\n  does not compose: {type(err).__name__}: {err}") from err


def _check_flags(cmd: Command, argv: tuple[str, ...], args: list[str]) -> None:
    flags = [a.split("=")[0] for a in args if a.startswith("--")]
    if not flags:
        return
    # Read from the parser's source rather than `--help`: importing torch in a subprocess per
    # command costs ~20-50 s on a busy 2-core machine.
    text = _source_of(argv)
    missing = [f for f in flags if f'"{f}"' not in text and f"'{f}'" not in text]
    # flags made from dataclass fields (`--steps` from `steps: int = ...`)
    field = r"^\s+{}\s*:"
    missing = [
        f for f in missing if not re.search(field.format(f[2:].replace("-", "_")), text, re.M)
    ]
    if missing:  # flags built at run time (e.g. from a dataclass): ask the parser itself
        text = _help_text(argv)
        missing = [f for f in flags if f not in text]
    assert not missing, f"{cmd}: {' '.join(argv)} defines no argument {missing}"


# ------------------------------------------------------------------------------ tests


def test_commands_are_found():
    """The extractor sees the documented paths (a parser regression would hide every doc)."""
    texts = [c.text for c in all_commands()]
    assert len(texts) >= 20
    for needle in ("idgen-train", "idgen-sample", "idgen-eval hparams_search=guidance_grid"):
        assert any(t.startswith(needle) for t in texts), needle
    assert any(c.source.startswith("idgen/conf/") for c in all_commands())
    assert any(c.source.startswith("experiments/") for c in all_commands())


def test_extractor_on_a_known_document(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "Run `idgen-train -m data.resolution=256,512` now.\n"
        "```bash\n"
        "export SD15=/models/sd15\n"
        "for d in a b; do\n"
        "  HF_HUB_OFFLINE=1 idgen-sample model=sd15 \\\n"
        "    model.pretrained=$SD15 # comment\n"
        "done\n"
        "```\n"
        "```python\nidgen-eval not_a_command=1\n```\n"
    )
    old = globals()["ROOT"]
    globals()["ROOT"] = tmp_path
    try:
        found = [c.text for c in commands_in_markdown(doc)]
    finally:
        globals()["ROOT"] = old
    assert found == [
        "idgen-train -m data.resolution=256,512",
        "idgen-sample model=sd15 model.pretrained=$SD15",
    ]


def test_an_unknown_key_fails_the_check(tmp_path):
    """The check can fail: a misspelt key, an unknown option, an unparsable override."""
    for bad in (
        "idgen-sample prompts_file=x.txt",
        "idgen-eval metrics=no_such_suite",
        "idgen-eval 'sample.overrides=[model=tiny,domain_model=x]'",
    ):
        with pytest.raises(AssertionError):
            check_command(Command("test", bad), tmp_path)


@pytest.mark.parametrize("cmd", all_commands(), ids=str)
def test_documented_command(cmd, tmp_path):
    check_command(cmd, tmp_path)
