"""README contract: the two opening commands, and every setting documented."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from fanout import settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_opens_with_exactly_two_commands() -> None:
    block = re.search(r"```\n(.*?)```", README, re.S)
    assert block is not None and README.index("```") < README.index("\n## ")
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert commands == [
        "pip install . && fanout serve --demo",
        "pip install -e '.[test]' && python -m pytest -n 3",
    ]


def test_every_setting_is_in_the_configuration_table() -> None:
    missing = []
    for section in msgspec.structs.fields(settings.Settings):
        for field in msgspec.structs.fields(section.type):
            path = f"{section.name}.{field.name}"
            env = f"FANOUT_{section.name.upper()}_{field.name.upper()}"
            if not re.search(rf"^\| `{re.escape(path)}` \|[^\n]*`{env}`", README, re.M):
                missing.append(path)
    assert missing == []


def test_seed_environment_names_are_documented() -> None:
    for name in settings.SHORT_ENV:
        assert f"`{name}`" in README, name
