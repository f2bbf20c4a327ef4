"""The README's minimal example runs as written and its claims hold."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_minimal_example_runs_as_written(capsys):
    text = README.read_text()
    code = re.search(r"## Minimal example\n\n```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README
    assert "full_batch" in capsys.readouterr().out


def test_readme_has_exactly_the_two_commands():
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", README.read_text(), re.S)
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert [c for c in commands if c] == ["make run", "make test"]
    assert "make test" in (README.parent / ".ci" / "run").read_text()
