"""The README stays true: its commands are what CI runs, its plugin table is current."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_opens_with_the_two_fresh_machine_commands():
    first, second = code_blocks(README)[:2]
    assert first == "pip install -e . && n2a train"
    assert "pytest" in second


def test_ci_runs_the_readme_test_command():
    test_command = code_blocks(README)[1]
    ci = (ROOT / ".ci" / "run").read_text()
    # CI uses `python -m pip` for the same install; otherwise the line is identical.
    assert test_command.replace("pip install", "python -m pip install -q") in ci


def test_plugin_table_is_current():
    from cli.plugins_cmd import readme_with_table

    assert README == readme_with_table(README), "run `python -m cli.plugins_cmd README.md`"


def test_every_builtin_plugin_is_in_the_readme():
    from n2a_core.plugins import get_registry

    for component in get_registry().all():
        if component.source.package == "n2a":
            assert f"| {component.kind} | `{component.name}` |" in README
