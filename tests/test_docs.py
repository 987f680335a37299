"""The docs are kept true by tests, not by eye:

- every `mace-ray ...` command line of the docs parses against the real command line (the
  command exists, every option exists, choices and numbers are valid); inline mentions in
  prose name existing commands and options;
- every relative link and every repository path a doc names in backticks resolves;
- jobs/runtime_env.yaml's pip list is pyproject.toml's dependencies (and the torch pins of
  scripts/setup.sh);
- the metric names the docs give are the ones mace-ray exports;
- every `results/...` file a doc cites exists, and every section of benchmarks/README.md that
  quotes a measured figure names its result file or says the figure is projected.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import tomllib
import typer.main
import yaml

from mace_ray.cli.options import Failed

REPO = Path(__file__).resolve().parents[1]
DOCS = [
    REPO / "README.md",
    REPO / "jobs" / "README.md",
    REPO / "cluster" / "README.md",
    REPO / "benchmarks" / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
]
# Placeholders of the examples and what stands in for them when a line is parsed.
PLACEHOLDERS = {
    "<run_id>": "0123456789abcdef",
    "<RUN_ID>": "0123456789abcdef",
    "<id>": "0123456789abcdef",
    "${c}": "dog",
    "$c": "dog",
    '"$PWD': f'"{REPO}',
    "$PWD": str(REPO),
}
SKIP_TOKENS = {"--help", "--help-all", "--version"}


def cli() -> click.Group:
    from mace_ray.cli.main import app

    return typer.main.get_command(app)


def code_blocks(text: str) -> list[str]:
    """Fenced blocks and indented (4-space) blocks, continuation lines joined."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    indented, current, previous_blank = [], [], True
    for line in prose.splitlines():
        if line.startswith("    ") and (current or previous_blank):
            current.append(line.strip())
        elif current and not line.strip():
            current.append("")
        elif current:
            indented.append("\n".join(current))
            current = []
        previous_blank = not line.strip()
    if current:
        indented.append("\n".join(current))
    return [re.sub(r"\\\n\s*", " ", b) for b in blocks + indented]


def command_lines(text: str) -> list[str]:
    """The argument part of every `mace-ray ...` in the code blocks of ``text``."""
    out = []
    for block in code_blocks(text):
        for line in block.splitlines():
            line = line.split(" #", 1)[0]
            for m in re.finditer(r"(?:^|[\s/])mace-ray((?:\s+[^;|&)]*)?)", line):
                out.append(m.group(1).strip())
    return out


def substitute(command: str) -> str:
    for k, v in PLACEHOLDERS.items():
        command = command.replace(k, v)
    return command


def parse(command: str) -> click.Context:
    """Parse ``mace-ray COMMAND`` with the real commands (names, types, choices); run nothing."""
    args = [a for a in shlex.split(substitute(command)) if a not in SKIP_TOKENS]
    group = cli()
    assert args, "a bare `mace-ray`"
    sub = group.get_command(click.Context(group), args[0])
    assert sub is not None, f"no command {args[0]!r}"
    return sub.make_context(args[0], args[1:])


def all_commands() -> list[tuple[str, str]]:
    return [(doc.relative_to(REPO).as_posix(), c) for doc in DOCS for c in command_lines(doc.read_text())]


def test_the_docs_have_command_lines_to_check():
    found = all_commands()
    assert len(found) >= 20, found
    assert {c.split()[0] for _, c in found if c} >= {"erase", "eval", "audit", "apply"}


@pytest.mark.parametrize("doc, command", all_commands(), ids=lambda x: str(x)[:60])
def test_every_command_line_of_the_docs_parses(doc, command, monkeypatch):
    monkeypatch.chdir(REPO)  # the docs' relative paths are the repo root's
    if not command or command.startswith("-"):
        return  # `mace-ray --version` and the like: the group's own flags
    try:
        parse(command)
    except (click.UsageError, Failed) as e:
        pytest.fail(f"{doc}: `mace-ray {command}`: {e}")


def test_a_wrong_option_or_choice_in_a_doc_would_fail():
    with pytest.raises((click.UsageError, Failed), match="ouput"):
        parse("erase jobs/example_concepts.txt --ouput x")
    with pytest.raises((click.UsageError, Failed), match="sam9"):
        parse("erase jobs/example_concepts.txt --masker sam9")


def inline_mentions(text: str) -> list[tuple[str, list[str]]]:
    """`mace-ray CMD --opt ...` in backticks in prose: the command and the options it names."""
    out = []
    for span in re.findall(r"`mace-ray ([^`]+)`", text):
        words = span.split()
        if not words or words[0].startswith("-"):
            continue
        out.append((words[0], [w.split("=")[0] for w in words[1:] if w.startswith("--")]))
    return out


def test_inline_mentions_name_existing_commands_and_options():
    group = cli()
    bad = []
    for doc in DOCS:
        for name, options in inline_mentions(doc.read_text()):
            sub = group.get_command(click.Context(group), name)
            if sub is None:
                bad.append(f"{doc.name}: `mace-ray {name}`: no such command")
                continue
            known = {o for p in sub.params for o in [*p.opts, *p.secondary_opts]} | SKIP_TOKENS
            bad += [f"{doc.name}: `mace-ray {name}`: no option {o}" for o in options if o not in known]
    assert not bad, bad


def test_every_relative_link_resolves():
    bad = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                bad.append(f"{doc.relative_to(REPO)}: link {target}")
    assert not bad, bad


def test_repository_paths_named_in_the_docs_exist():
    """`mace_core/...py`, `mace_ray/...`, `benchmarks/x.py`, `tests/test_x.py`, `jobs/...`,
    `cluster/...` in backticks: the file or folder is there."""
    pattern = re.compile(r"`((?:mace_core|mace_ray|benchmarks|tests|jobs|cluster|scripts|docs)/[\w./-]+)`")
    bad = []
    for doc in DOCS:
        for path in pattern.findall(doc.read_text()):
            if "<" in path or "*" in path:
                continue
            if not (REPO / path.rstrip("/")).exists():
                bad.append(f"{doc.relative_to(REPO)}: {path}")
    assert not bad, bad


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_runtime_env_pip_list_is_the_projects_dependencies():
    """jobs/runtime_env.yaml's (commented) pip list copies pyproject.toml: the same packages
    with the same ranges, the eval extra included, torch/torchvision as scripts/setup.sh pins."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {requirement_name(s): s.replace(" ", "") for s in project["dependencies"]}
    wanted.update({requirement_name(s): s.replace(" ", "") for s in project["optional-dependencies"]["eval"]})
    setup = (REPO / "scripts" / "setup.sh").read_text()
    for name in ("torch", "torchvision"):
        pin = re.search(rf"{name}==[\d.]+", setup)
        assert pin, f"scripts/setup.sh pins no {name}"
        wanted[name] = pin.group(0)
    text = (REPO / "jobs" / "runtime_env.yaml").read_text()
    block = re.search(r"^# pip:\n((?:#.*\n)+)", text, flags=re.M)
    assert block, "jobs/runtime_env.yaml has no commented pip list"
    listed = yaml.safe_load("\n".join(line[2:] for line in block.group(1).splitlines()))
    packages = listed["packages"]
    got = {requirement_name(s): s.replace(" ", "") for s in packages}
    assert got == wanted


def test_metric_names_in_the_docs_are_the_exported_ones():
    from mace_ray.engine.metrics import EXPORTED

    exported = set(EXPORTED)
    named = set()
    for doc in DOCS:
        named |= set(re.findall(r"\bray_mace_\w+|\bmace_(?:concepts|stage|worker)_\w+", doc.read_text()))
    assert named, "no metric named in the docs"
    assert all(n.startswith("ray_mace_") for n in named), sorted(n for n in named if not n.startswith("ray_"))
    assert named <= exported, sorted(named - exported)
    readme = (REPO / "README.md").read_text()
    assert all(n in readme for n in exported), sorted(n for n in exported if n not in readme)


def test_every_cited_result_file_exists():
    bad = []
    for doc in DOCS:
        for rel in re.findall(r"results/[\w.-]+\.json", doc.read_text()):
            if not (REPO / "benchmarks" / rel).is_file():
                bad.append(f"{doc.relative_to(REPO)}: {rel}")
    assert not bad, bad


FIGURE = re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s|GB|MB|GiB|MiB|x)\b")


def test_every_benchmark_section_with_figures_names_its_results_or_says_projected():
    text = (REPO / "benchmarks" / "README.md").read_text()
    sections = re.split(r"\n(?=## )", text)
    bad = []
    for section in sections[1:]:
        title = section.splitlines()[0]
        if FIGURE.search(section) and not re.search(r"results/[\w.-]+\.json|projected|estimate", section):
            bad.append(title)
    assert not bad, bad
