"""README.md tells the truth: its example runs and prints what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parent.parent / "README.md").read_text()


def block(after: str, language: str) -> str:
    start = README.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.DOTALL).search(README, start)
    assert match is not None, f"no {language} block after {after!r}"
    return match.group(1)


def test_saga_example_runs_and_prints_what_the_readme_says(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(block("### A saga in a few lines", "python"))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == block("It prints:", "text")


def test_quick_start_commands_are_the_ones_ci_runs() -> None:
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    tests_command = block("Run the tests", "sh").strip()
    assert tests_command.endswith("&& pytest")
    assert "README.md" in ci  # .ci/run reads the command from here, not a copy
    assert "saga demo" in block("## Quick start", "sh")


def test_testing_section_example_is_a_passing_test(tmp_path: Path) -> None:
    test_file = tmp_path / "test_trips.py"
    test_file.write_text(block("## Testing your sagas", "python"))
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(
        # pytest-asyncio's default (strict) mode, as in a project of the reader's own.
        [*pytest, "-o", "asyncio_mode=strict", "--rootdir", str(tmp_path), str(test_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
