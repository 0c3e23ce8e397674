#!/usr/bin/env python3
"""The sans-I/O part of ``sub_churn.py`` phase 1, in process: CPU µs per sub/unsub op.

What the worker's core does for one connection going 0 → 1000 → 0 (the same
patterns as ``sub_churn.py``): the ACL check of each ``sub``, the subscription
table's turn, and the overlap bookkeeping of each SUB and UNSUB. No sockets, so
the figure is steadier than the whole worker's on a shared machine; run it
against another tree with ``PYTHONPATH``::

    PYTHONPATH=/tmp/before python loadtests/sub_core.py
    PYTHONPATH=$PWD python loadtests/sub_core.py
"""

from __future__ import annotations

import argparse
import json
import time

from sub_churn import patterns

from fanout.core.acl import SubjectAcl
from fanout.core.overlap import Overlaps, Route
from fanout.core.subscriptions import Subscriptions


def one_round(acl: SubjectAcl, pats: list[str]) -> None:
    """0 → len(pats) → 0, unsubscribing in reverse order as ``sub_churn.py`` does."""
    overlaps = Overlaps()
    table = Subscriptions()
    routes: dict[str, Route] = {}
    for pattern in pats:
        if acl.check(pattern) is not None:
            raise RuntimeError(f"denied: {pattern}")
        table.want(pattern)
    for sid, (_, pattern) in enumerate(table.take().commands, 1):
        routes[pattern] = overlaps.add(sid, pattern)
    for pattern in reversed(pats):
        table.unwant(pattern)
    turn = table.take()
    for _, pattern in turn.commands:
        overlaps.drain(routes[pattern])
    table.confirmed(turn)
    for _, pattern in turn.commands:
        overlaps.remove(routes.pop(pattern))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--samples", type=int, default=9, help="timed samples (min and median shown)")
    p.add_argument("--rounds", type=int, default=5, help="0 -> 1000 -> 0 cycles per sample")
    args = p.parse_args()
    acl = SubjectAcl(["xy.md.>"], ["xy.md.>"], allow_full_wildcard=True)
    pats = patterns("xy.md.churn.solo")
    samples: list[float] = []
    for _ in range(args.samples):
        start = time.process_time()
        for _ in range(args.rounds):
            one_round(acl, pats)
        samples.append((time.process_time() - start) / args.rounds / (2 * len(pats)) * 1e6)
    samples.sort()
    print(
        json.dumps(
            {
                "cpu_us_per_op_min": round(samples[0], 2),
                "median": round(samples[len(samples) // 2], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
