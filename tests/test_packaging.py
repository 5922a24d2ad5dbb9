"""The wheel, as ``pip install choreosaga`` would install it.

It must install only the library's own top-level packages (``saga`` and
``outbox``): a top-level ``services`` would collide with the applications that
embed the library. The reference shop ships inside, as ``saga._shop``, and
plugs ``saga demo`` in through an entry point; the library never imports it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support import parse_python

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a clean copy of the sources: no stale build/ directory can leak in.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for name in ("saga", "outbox", "services", "schemas"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("choreosaga-*.whl")
    return built


@pytest.fixture(scope="module")
def unpacked(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def test_the_wheel_installs_only_saga_and_outbox(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert tops == {"saga", "outbox"}
    assert "saga/_shop/demo.py" in names
    assert "saga/_schemas/choreosaga/saga/Compensate.avsc" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(metadata).decode()
        entry_points = archive.read(metadata.replace("METADATA", "entry_points.txt")).decode()
    assert "License-Expression: Apache-2.0" in text
    assert "[choreosaga.commands]" in entry_points
    assert "demo = saga._shop.commands:register" in entry_points


def test_saga_demo_runs_from_the_wheel_alone(unpacked: Path, tmp_path: Path) -> None:
    # The unpacked wheel first on the path, and a working directory outside
    # the checkout: nothing can come from the source tree.
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import saga._shop.demo as d, saga; print(d.__file__, saga.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=env,
    )
    assert all(path.startswith(str(unpacked)) for path in where.stdout.split())
    helped = subprocess.run(
        [sys.executable, "-m", "saga", "demo", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert helped.returncode == 0, helped.stderr
    assert "--database-url" in helped.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "saga", "demo", "--database-url", "notaurl"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip() == "saga demo: --database-url is not a database URL: 'notaurl'"


def test_the_library_never_imports_the_shop() -> None:
    for path in [*(ROOT / "saga").rglob("*.py"), *(ROOT / "outbox").rglob("*.py")]:
        tree = parse_python(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] != "services", f"{path} imports {module}"
                assert not module.startswith("saga._shop"), f"{path} imports {module}"
