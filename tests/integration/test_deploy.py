"""The image's command, run for real: env only, no config file; its HEALTHCHECK follows the port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fanout.embedded_nats import EmbeddedNats
from tests.conftest import launch_gateway
from tests.unit.test_deploy import DOCKERFILE, parse_dockerfile


def healthcheck(command: str, port: int) -> int:
    """Run the HEALTHCHECK as Docker does (``/bin/sh -c``), with this interpreter as ``python``."""
    assert command.startswith("python ")
    shell = f"{sys.executable} {command.removeprefix('python ')}"
    env = {"FANOUT_SERVER_PORT": str(port)}
    return subprocess.run(["/bin/sh", "-c", shell], env=env, timeout=30).returncode


def test_image_command_starts_from_the_environment_and_healthcheck_follows_the_port(
    nats_server: EmbeddedNats, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    image = parse_dockerfile(DOCKERFILE.read_text())
    assert image.command[:2] == ["fanout", "serve"]
    env = {
        k: v
        for k, v in image.env.items()
        if k not in ("FANOUT_SERVER_PORT", "FANOUT_SERVER_HOST", "FANOUT_ADMIN_HOST")
    }
    gw = launch_gateway(
        tmp_path,
        *image.command[2:],
        "--workers",
        "1",
        NATS_URLS=nats_server.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        **env,
    )
    try:
        assert healthcheck(image.healthcheck, gw.port) == 0
    finally:
        assert gw.stop() == 0
    assert healthcheck(image.healthcheck, gw.port) == 1
