"""``fanout top``: the live view of a running gateway in the terminal.

It asks the admin listener's ``/admin/state.json`` (the JSON ``/admin`` polls,
see :mod:`fanout.worker.admin`) once a second and draws one row per worker and
a totals row. ``--json`` prints that JSON as it is; ``--once`` stops after one
read. Only the standard library: it runs wherever ``fanout`` is installed.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO

from fanout.errors import OperatorError

#: Columns: header, width, how a worker row (or the totals) shows it.
Column = tuple[str, int, Callable[[dict[str, Any]], str]]


class Unreachable(OperatorError):
    """The admin listener did not answer; the message says where and why."""


def fetch(url: str, timeout: float = 3.0) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            view: dict[str, Any] = json.loads(resp.read())
            return view
    except urllib.error.HTTPError as exc:
        raise Unreachable(f"{url}: HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"{url}: {reason}") from None


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _state(row: dict[str, Any]) -> str:
    flags = [row["nats"]]
    flags += [flag for flag in ("draining", "shedding") if row.get(flag)]
    return ",".join(flags)


COLUMNS: list[Column] = [
    ("WORKER", 7, lambda r: str(r["index"])),
    ("PID", 8, lambda r: str(r["pid"])),
    ("CLIENTS", 8, lambda r: str(r["clients"])),
    ("SUBS", 8, lambda r: str(r["subscriptions"])),
    ("DELIV/S", 10, lambda r: f"{r['deliveriesPerSecond']:.1f}"),
    ("DROPS/S", 8, lambda r: f"{r['dropsPerSecond']:.1f}"),
    ("OUTBOX", 7, lambda r: str(r["outboxMax"])),
    ("LAG ms", 7, lambda r: f"{r['loopLagSeconds'] * 1000:.1f}"),
    ("RSS", 10, lambda r: _bytes(r["rssBytes"])),
    ("FDS", 6, lambda r: str(r["openFds"])),
    ("NATS", 0, _state),
]


def render(view: dict[str, Any]) -> str:
    """The table ``fanout top`` draws for one read of the live view."""
    wanted = view.get("workersWanted")
    restarts = view.get("restarts") or {}
    totals = dict(view["totals"])
    lines = [
        f"fanout {view['version']}  status {view['status']}  "
        f"workers {totals['workers']}/{wanted if wanted is not None else '?'}  "
        f"restarts {sum(restarts.values())}"
        + (f" ({', '.join(f'{k} {v}' for k, v in restarts.items())})" if restarts else ""),
        "",
        "".join(f"{name:>{width}} " if width else name for name, width, _ in COLUMNS),
    ]
    for row in view["workers"]:
        lines.append("".join(f"{show(row):>{w}} " if w else show(row) for _, w, show in COLUMNS))
    totals.update(
        index="all",
        pid="",
        nats=f"{totals['natsConnected']}/{totals['workers']} connected",
    )
    lines.append("".join(f"{show(totals):>{w}} " if w else show(totals) for _, w, show in COLUMNS))
    return "\n".join(lines) + "\n"


def run(
    url: str,
    *,
    once: bool,
    as_json: bool,
    interval: float,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Print the live view every ``interval`` seconds until Ctrl-C (or once); the exit code."""
    clear = out.isatty() and not as_json and not once
    while True:
        try:
            view = fetch(url)
        except Unreachable as exc:
            print(f"fanout top: cannot read the admin listener: {exc}", file=err)
            if once:
                return 1
        else:
            text = json.dumps(view, sort_keys=True) + "\n" if as_json else render(view)
            out.write(("\x1b[H\x1b[2J" if clear else "") + text)
            out.flush()
            if once:
                return 0
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return 0
