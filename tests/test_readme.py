"""The README's two commands stay true: CI runs exactly the test command it gives."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quick_start_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_gives_exactly_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    for command in commands:
        assert "\n" not in command, "each command is one line a user can paste"
        assert "pip install torch==2.13.0" in command, "the CPU torch wheel must be installed first"


def test_ci_runs_the_readme_test_command_and_nothing_else():
    test_command = quick_start_commands()[1]
    assert "pytest" in test_command
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[-1] == test_command
    assert all(ln.startswith(("set ", "cd ")) for ln in lines[:-1]), lines
