"""Deploy files, checked without Docker or a running systemd: the unit verifies, the image starts.

The Dockerfile is parsed (docker is not available here): its command must start the
gateway from environment variables alone, and its HEALTHCHECK must follow the
configured port. ``tests/integration/test_deploy.py`` runs that command for real.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fanout import settings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "fanout.service"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


@dataclass
class Dockerfile:
    """The instructions this project's Dockerfile uses, as data."""

    env: dict[str, str] = field(default_factory=dict)
    expose: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: str = ""

    @property
    def command(self) -> list[str]:
        return [*self.entrypoint, *self.cmd]


def parse_dockerfile(text: str) -> Dockerfile:
    """Join continuation lines, drop comments; read ENV, EXPOSE, ENTRYPOINT, CMD, HEALTHCHECK."""
    out = Dockerfile()
    logical = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
    )
    for line in logical.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        match instruction.upper():
            case "ENV":
                for pair in shlex.split(rest):
                    key, _, value = pair.partition("=")
                    out.env[key] = value
            case "EXPOSE":
                out.expose += rest.split()
            case "ENTRYPOINT":
                out.entrypoint = json.loads(rest)
            case "CMD":
                out.cmd = json.loads(rest)
            case "HEALTHCHECK":
                _, sep, command = rest.partition(" CMD ")
                assert sep, "HEALTHCHECK needs CMD"
                out.healthcheck = command.strip()
    return out


def test_dockerfile_command_needs_no_config_file() -> None:
    image = parse_dockerfile(DOCKERFILE.read_text())
    assert image.command == ["fanout", "serve"]
    assert "FANOUT_CONFIG" not in image.env
    assert not any("/etc/fanout" in part or "--config" in part for part in image.command)


def test_dockerfile_healthcheck_uses_the_configured_port() -> None:
    image = parse_dockerfile(DOCKERFILE.read_text())
    port = image.env["FANOUT_SERVER_PORT"]
    assert port == str(settings.Server().port)
    assert port in image.expose
    assert "${FANOUT_SERVER_PORT}" in image.healthcheck
    assert not re.search(r":[0-9]+/", image.healthcheck), image.healthcheck
    assert "/healthz" in image.healthcheck


def test_dockerfile_exposes_the_admin_port_to_the_container_network() -> None:
    """In a container, loopback is the container's own: Prometheus could never scrape it."""
    image = parse_dockerfile(DOCKERFILE.read_text())
    assert image.env["FANOUT_ADMIN_HOST"] == "0.0.0.0"
    assert "FANOUT_ADMIN_PORT" not in image.env
    assert str(settings.Admin().port) in image.expose


def test_prometheus_scrapes_the_admin_port() -> None:
    scrape = (ROOT / "deploy" / "prometheus" / "scrape.yml").read_text()
    targets = re.findall(r'"[\w.-]+:(\d+)"', scrape)
    assert targets and set(targets) == {str(settings.Admin().port)}


def test_parse_dockerfile_reads_json_and_shell_forms() -> None:
    image = parse_dockerfile(
        '# c\nENV A=1 B="two words"\nEXPOSE 80\nHEALTHCHECK --interval=5s \\\n'
        '  CMD curl -f http://x:${P}/\nENTRYPOINT ["a"]\nCMD ["b", "c"]\n'
    )
    assert image.env == {"A": "1", "B": "two words"}
    assert image.expose == ["80"]
    assert image.healthcheck == "curl -f http://x:${P}/"
    assert image.command == ["a", "b", "c"]


def unit_with_stub(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart pointing at an executable stub (no /opt/fanout here)."""
    stub = tmp_path / "fanout"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    assert "ExecStart=/opt/fanout/bin/fanout " in text
    unit = tmp_path / "fanout.service"
    unit.write_text(text.replace("/opt/fanout/bin/fanout", str(stub)))
    return unit


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    out = verify(unit_with_stub(tmp_path, UNIT.read_text()))
    assert out.returncode == 0, out.stderr
    assert out.stdout + out.stderr == ""


def test_systemd_unit_with_port_443_capability_verifies(tmp_path: Path) -> None:
    """The commented guidance for binding 443 is valid systemd when switched on."""
    text = UNIT.read_text()
    assert "#AmbientCapabilities=CAP_NET_BIND_SERVICE\n" in text
    assert "#CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in text
    text = text.replace("#AmbientCapabilities=", "AmbientCapabilities=")
    text = text.replace("#CapabilityBoundingSet=", "CapabilityBoundingSet=")
    out = verify(unit_with_stub(tmp_path, text))
    assert out.returncode == 0, out.stderr
    assert out.stdout + out.stderr == ""


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: an unknown key is reported."""
    text = UNIT.read_text().replace("KillMode=mixed", "KillMode=mixed\nKilMode=mixed")
    out = verify(unit_with_stub(tmp_path, text))
    assert "Unknown key" in out.stderr


def test_systemd_unit_fits_the_settings() -> None:
    """Stop timeout above the drain time; reload is SIGHUP; secrets come from fanout.env."""
    keys = dict(
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if re.match(r"^[A-Z]\w*=", line)
    )
    assert int(keys["TimeoutStopSec"]) > settings.Server().graceful_timeout_s + 1
    assert keys["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert keys["EnvironmentFile"] == "-/etc/fanout/fanout.env"
    assert keys["ExecStart"] == "/opt/fanout/bin/fanout serve --config /etc/fanout/fanout.toml"
    assert (keys["User"], keys["KillSignal"]) == ("fanout", "SIGTERM")
