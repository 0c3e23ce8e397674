"""The load tools start: --help shows every default, the locustfile imports and needs no setup.

Each runs in a subprocess: importing locust monkey-patches the whole process (gevent).
The tools need the ``load`` extra (picows, locust); without it these tests are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def needs(*modules: str) -> None:
    for name in modules:
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (pip install -e '.[load]')")


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    clean["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("tool", "modules", "expected"),
    [
        ("bench.py", ["picows"], ["--url", "(default: 1000)", "(default: demo,btc,eth,sol)"]),
        ("idle_memory.py", ["picows"], ["(default: 10000)"]),
        ("request_overhead.py", [], ["(default: 3000)", "(default: plain)"]),
        ("screenshot.py", ["playwright"], ["(default: 20.0)"]),
        ("seq_ingest.py", [], ["(default: 50000)", "(default: core,republish"]),
        ("resume_storm.py", [], ["(default: 5000)", "(default: 2)"]),
        ("admin_screenshot.py", ["playwright"], ["(default: 6)", "(default: kill)"]),
    ],
)
def test_help_shows_the_defaults(tool: str, modules: list[str], expected: list[str]) -> None:
    needs(*modules)
    done = run([f"loadtests/{tool}", "--help"])
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines
    for item in expected:
        assert item in text


def test_bench_refuses_url_options_without_url() -> None:
    needs("picows")
    done = run(["loadtests/bench.py", "--nats", "nats://127.0.0.1:4222"])
    assert done.returncode == 2 and "go with --url" in done.stderr


PROBE = """
import json, runpy
m = runpy.run_path("loadtests/locustfile.py")
print(json.dumps({
    "publisher_abstract": m["NatsPublisher"].abstract,
    "token": m["token"](),
    "urls": [m["ws_url"](h) for h in
             ("http://127.0.0.1:8080", "http://h:1/", "ws://h:2/ws", "https://h/x")],
    "subjects": [m["subject_for"](n) for n in range(5)],
}))
"""


def probe_locustfile(**env: str) -> dict[str, object]:
    done = run(["-c", PROBE], **env)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_locustfile_runs_against_the_demo_with_no_variables() -> None:
    needs("locust")
    got = probe_locustfile()
    assert got == {
        "publisher_abstract": True,  # the demo publisher sends the ticks
        "token": None,  # anonymous, as `fanout serve --demo` allows
        "urls": ["ws://127.0.0.1:8080/ws", "ws://h:1/ws", "ws://h:2/ws", "wss://h/x"],
        "subjects": [f"xy.md.tick.{s}" for s in ("demo", "btc", "eth", "sol", "demo")],
    }


def test_locustfile_publishes_itself_when_given_a_nats_url() -> None:
    needs("locust")
    got = probe_locustfile(FANOUT_LOCUST_NATS="nats://127.0.0.1:4222", FANOUT_LOCUST_SUBJECTS="2")
    assert got["publisher_abstract"] is False
    assert got["subjects"] == [f"xy.md.bench.{n % 2}" for n in range(5)]
