"""`fanout serve`'s supervisor: forks the workers, keeps them alive, rolls them on SIGHUP.

Shaped after gunicorn's arbiter, smaller, in four parts:

- :mod:`~fanout.supervisor.arbiter`: the main loop (:class:`Supervisor`), top to bottom;
- :mod:`~fanout.supervisor.policy`: every rule as pure code (backoff, heartbeat verdict,
  boot-halt, scaling, the rolling restart's state machine), unit-tested without fork;
- :mod:`~fanout.supervisor.signals`: handlers only enqueue; a self-pipe wakes the loop;
- :mod:`~fanout.supervisor.children`: fork, reset in the child, PDEATHSIG, kill, reap.

The supervisor opens no sockets, has no NATS client and never exports
metrics; it imports prometheus_client only to mark reaped workers dead. What
else runs beside the workers is handed in by whoever needs it: ``fanout
serve`` passes the embedded nats-server as a :class:`~fanout.supervisor.children.Sidecar`
and the demo's side processes as ``extra_children``.

Heartbeats: a worker must write its first state file within 2 × worker_timeout_s
of its fork (boot grace) and then keep ``heartbeat_at`` changing; silence for
worker_timeout_s gets it SIGABRT, then SIGKILL 2 s later, and a replacement.
Replacements keep the dead worker's index and back off 0.1 s, doubling to 10 s,
reset once a worker has lived 30 s.

Signals: TERM/INT stop gracefully (workers get SIGTERM and drain for
graceful_timeout_s, SIGKILL only 1 s after that); a second INT, or QUIT, stops
at once (SIGQUIT, SIGKILL 1 s later). HUP reloads the config and rolls the
workers one at a time: each new worker must report listening within
worker_timeout_s before its predecessor gets SIGUSR1, or the roll stops and the
previous settings stay in force. TTIN / TTOU add / remove one worker (never
below one; the newest leaves). Children start with SIGINT/SIGHUP ignored
(Ctrl-C reaches the whole process group) and get SIGTERM from Linux if the
supervisor dies (PR_SET_PDEATHSIG).

Exit codes: 0 after a stop that was asked for (graceful or quick: the operator
asked, it stopped); 1 on a supervisor bug; 2 when the gateway cannot start (state
directory, embedded nats-server, or no worker ever booted), with one line
``fanout: <reason>`` on stderr.

Besides the workers' own files (see :mod:`fanout.runtime`), the supervisor
writes ``supervisor.json`` in the state directory whenever it changes::

    {"pid": 4711, "workers_wanted": 4, "generation": 2, "updated_at": 1700000000.5,
     "restarts": {"boot_error": 0, "crash": 1, "exit": 0, "signal": 2, "timeout": 0}}

``generation`` counts reloads (each worker also finds its own in the environment
variable ``FANOUT_GENERATION``, set in the child after the fork);
``restarts`` counts unplanned worker deaths by reason (``fanout_worker_restarts_total``):
``signal`` killed by a signal we did not send, ``crash`` non-zero exit,
``boot_error`` exit 3, ``timeout`` heartbeat stopped (we sent SIGABRT, then
SIGKILL), ``exit`` exit 0 unasked. Planned exits (``reload``, ``scale_down``,
``shutdown``) are logged, not counted. ``server.workers`` is read at start only:
use TTIN/TTOU to change the count of a running gateway.
"""

from fanout.runtime import WORKER_BOOT_ERROR
from fanout.supervisor.arbiter import Supervisor
from fanout.supervisor.children import ExtraTarget, Sidecar, WorkerTarget

__all__ = ["WORKER_BOOT_ERROR", "ExtraTarget", "Sidecar", "Supervisor", "WorkerTarget"]
