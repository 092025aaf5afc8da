"""The command-line blocks of README.md and docs/design.md cannot drift from the CLI:
every flag of every `sempart` command is in both, and neither names a flag the command
lacks. A block is a fenced code block whose lines start `sempart <command>`, with
indented continuation lines."""
from __future__ import annotations

import re
from pathlib import Path

import typer

from pipeline.cli import app

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "docs" / "design.md"]
FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*(?:/--[a-z0-9][a-z0-9-]*)?")
GLOBAL = "sempart"  # the options before the command: `sempart [--verbose] COMMAND ...`


def cli_flags(cli: typer.Typer) -> dict[str, set[str]]:
    """Each command's long options, as the docs write them (`--gpu/--no-gpu` for a switch
    pair); the options of the group itself under GLOBAL."""
    group = typer.main.get_command(cli)

    def flags(params) -> set[str]:
        found = set()
        for p in params:
            if p.param_type_name == "option":
                longs = [o for o in p.opts if o.startswith("--")][:1]
                negs = [o for o in p.secondary_opts if o.startswith("--")][:1]
                found.add("/".join(longs + negs))
        return found

    return {GLOBAL: flags(group.params)} | {name: flags(cmd.params) for name, cmd in group.commands.items()}


def documented_flags(text: str) -> dict[str, set[str]]:
    """Flags per command in the command-line block: the fenced block whose lines give
    each command's synopsis (it holds `sempart manifest SRC`)."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        lines = block.splitlines()
        if not any(ln.startswith("sempart manifest SRC") for ln in lines):
            continue
        found: dict[str, set[str]] = {}
        command = None
        for line in lines:
            if line.startswith("sempart "):
                word = line.split()[1]
                command = GLOBAL if word.startswith("[") else word
            if command is not None:
                found.setdefault(command, set()).update(FLAG.findall(line))
        return found
    raise AssertionError("no block of `sempart <command>` lines")


def drift(cli: typer.Typer, text: str) -> list[str]:
    """What the docs miss and what they name in vain, one line each."""
    have, wrote = cli_flags(cli), documented_flags(text)
    problems = []
    for command in sorted(set(have) | set(wrote)):
        for flag in sorted(have.get(command, set()) - wrote.get(command, set())):
            problems.append(f"{command}: {flag} is not documented")
        for flag in sorted(wrote.get(command, set()) - have.get(command, set())):
            problems.append(f"{command}: {flag} is documented but the CLI has no such flag")
    return problems


def test_docs_list_every_flag_of_the_cli_and_no_other() -> None:
    for doc in DOCS:
        assert drift(app, doc.read_text()) == [], doc.name


def test_a_flag_added_without_docs_is_caught() -> None:
    text = (REPO / "README.md").read_text()
    extra = typer.Typer(add_completion=False)
    extra.registered_callback = app.registered_callback
    extra.registered_commands = list(app.registered_commands)

    @extra.command("label2")
    def label2(shiny: bool = typer.Option(False, "--shiny")) -> None:
        """A command the docs do not know."""

    assert drift(extra, text) == ["label2: --shiny is not documented"]
    assert drift(app, text.replace("--resume", "--resum")) == [
        "label: --resume is not documented", "label: --resum is documented but the CLI has no such flag"]


def test_module_lists_name_every_module() -> None:
    """docs/design.md's Parts block describes every module of sempart_core and pipeline,
    and the README's Development block names each."""
    design, readme = (REPO / "docs" / "design.md").read_text(), (REPO / "README.md").read_text()
    parts = design[design.index("## Parts"):design.index("## How one image flows")]
    development = readme[readme.index("## Development"):]
    development = development[:development.index("```", development.index("```") + 3)]
    for package in ("sempart_core", "pipeline"):
        for module in sorted((REPO / package).glob("*.py")):
            if module.stem == "__init__":
                continue
            assert f"  {module.name} " in parts, f"{package}/{module.name} is missing from docs/design.md's Parts"
            assert re.search(rf"\b{module.stem}\b", development), f"{package}/{module.name} is missing from README"


def test_no_import_cycle_between_pipeline_modules() -> None:
    """The imports of pipeline/*.py form no cycle, those inside functions included (an
    import moved into a function to dodge a cycle is still a cycle)."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in (REPO / "pipeline").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "pipeline":
                    deps.update(alias.name for alias in node.names)
                elif node.module.startswith("pipeline."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline."))
        graph[path.stem] = deps - {path.stem}

    def visit(module: str, trail: list[str]) -> None:
        assert module not in trail, "import cycle: " + " -> ".join(trail + [module])
        for dep in graph.get(module, ()):
            visit(dep, trail + [module])

    for module in graph:
        visit(module, [])
