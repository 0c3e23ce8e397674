"""Command line: ``fanout serve | top | check-config | token | keygen | version``.

Nothing here imports prometheus_client or the worker modules at module level:
the supervisor must set ``PROMETHEUS_MULTIPROC_DIR`` before workers import them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fanout import __version__, settings
from fanout.core.protocol import PROTOCOL_VERSION

EXIT_CONFIG = 2
#: ``--demo`` makes the ticks recoverable: the embedded nats-server runs JetStream and the
#: demo publisher creates this stream (production streams are the operator's).
DEMO_STREAMS = {"xy.md.>": "MD"}
VERSION = f"fanout {__version__} (protocol v{PROTOCOL_VERSION})"


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "demo", False):
        out["demo.enabled"] = True
        out["ws.auth_required"] = False
        out["server.host"] = "127.0.0.1"
        if not ({"WS_REQUEST_WHITELIST", "FANOUT_REQUESTS_WHITELIST"} & set(os.environ)):
            out["requests.whitelist"] = ["svc.orders.>"]
        if not ({"FANOUT_HISTORY_STREAMS"} & set(os.environ)):
            out["history.streams"] = dict(DEMO_STREAMS)
    for flag, path in (
        ("workers", "server.workers"),
        ("host", "server.host"),
        ("port", "server.port"),
        ("admin_port", "admin.port"),
        ("log_level", "log.level"),
        ("log_format", "log.format"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            out[path] = value
    return out


def load_settings(args: argparse.Namespace) -> settings.Settings:
    try:
        return settings.load(args.config, overrides=_overrides(args))
    except settings.ConfigError as exc:
        print(f"fanout: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_settings(args)
    from fanout import logs
    from fanout.supervisor import Supervisor

    logs.setup(cfg.log.level, fmt=cfg.log.format)
    side: list[Any] = []
    if cfg.demo.enabled:
        from fanout.demo import side_processes

        side = side_processes()
    from fanout.embedded_nats import LocalNats
    from fanout.runtime import make_state_dir

    def worker_target(s: settings.Settings, index: int, state_dir: Path) -> int:
        from fanout.worker.main import run

        return run(s, index, state_dir)

    supervisor = Supervisor(
        cfg,
        worker_target=worker_target,
        state_dir=make_state_dir(),
        config_path=args.config,
        extra_children=side,
        overrides=_overrides(args),
        sidecar=LocalNats(),
    )
    return supervisor.run()


def cmd_top(args: argparse.Namespace) -> int:
    from fanout import top

    url = args.url
    if url is None:
        try:  # only admin.* matters here: not the client-auth rule, not the files it names
            cfg = settings.load(
                args.config, overrides={"ws.auth_required": False}, check_files=False
            )
        except settings.ConfigError as exc:
            print(f"fanout top: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        admin = cfg.admin
        if not admin.port:
            print("fanout top: admin.port is 0 (the admin listener is off)", file=sys.stderr)
            return EXIT_CONFIG
        host = "127.0.0.1" if admin.host in ("0.0.0.0", "") else admin.host
        url = f"http://{f'[{host}]' if ':' in host else host}:{admin.port}"
    state_url = url.rstrip("/") + "/admin/state.json"
    try:
        return top.run(state_url, once=args.once, as_json=args.json, interval=args.interval)
    except KeyboardInterrupt:
        return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_settings(args)
    print(json.dumps(settings.redacted(cfg), indent=2, sort_keys=True))
    return 0


def _patterns(text: str | None) -> list[str] | None:
    return None if text is None else [s.strip() for s in text.split(",") if s.strip()]


def cmd_token(args: argparse.Namespace) -> int:
    from fanout import devtoken

    try:
        ttl = devtoken.parse_ttl(args.ttl)
        key = Path(args.key).read_bytes()
        token = devtoken.make_token(
            private_key_pem=key,
            sub=args.sub,
            subjects=_patterns(args.subjects),
            ttl_s=ttl,
            kid=args.kid,
            issuer=args.iss,
            audience=args.aud,
            requests=_patterns(args.requests) or (),
        )
    except (OSError, ValueError) as exc:
        print(f"fanout token: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    cap = settings.Jwt().max_lifetime_s
    if ttl > cap:
        print(
            f"fanout token: warning: --ttl {args.ttl} ({ttl} s) is longer than the gateway's"
            f" default jwt.max_lifetime_s ({cap} s): it refuses this token unless that is raised",
            file=sys.stderr,
        )
    print(token)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from fanout import devtoken

    out = Path(args.out)
    priv_path, pub_path = out / "private.pem", out / "public.pem"
    for path in (priv_path, pub_path):
        if path.exists() and not args.force:
            print(
                f"fanout keygen: {path} exists; use --force to replace the key pair",
                file=sys.stderr,
            )
            return EXIT_CONFIG
    out.mkdir(parents=True, exist_ok=True)
    private, public = devtoken.generate_keypair(args.kind)
    priv_path.write_bytes(private)
    os.chmod(priv_path, 0o600)
    pub_path.write_bytes(public)
    print(f"wrote {priv_path} and {pub_path}")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(VERSION)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fanout", description="NATS -> WebSocket fan-out gateway")
    p.add_argument("-V", "--version", action="version", version=VERSION)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the supervisor and its workers")
    serve.add_argument("--config", help="TOML file (also FANOUT_CONFIG)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="embedded NATS + demo publisher, anonymous read of xy.md.>, 127.0.0.1",
    )
    serve.add_argument("--workers", type=int, help="worker processes (default: one per CPU)")
    serve.add_argument("--host", help="listen address (server.host, default 0.0.0.0)")
    serve.add_argument(
        "--port", type=int, help="listen port shared by all workers (server.port, default 8080)"
    )
    serve.add_argument(
        "--admin-port",
        type=int,
        help="admin listener port: /metrics, detailed /healthz, /admin"
        " (admin.port, default 9090 on 127.0.0.1; 0 turns it off)",
    )
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log.level (default info); debug adds a line per connection opened and closed",
    )
    serve.add_argument(
        "--log-format",
        choices=["auto", "json", "text"],
        help="log.format (default auto: text on a terminal, else JSON lines)",
    )
    serve.set_defaults(func=cmd_serve)

    top = sub.add_parser(
        "top", help="live view of a running gateway (per worker and totals), from its admin port"
    )
    top.add_argument("--config", help="TOML file (also FANOUT_CONFIG), to find admin.host/port")
    top.add_argument(
        "--url", help="admin listener, e.g. http://127.0.0.1:9090 (default: from the config)"
    )
    top.add_argument("--once", action="store_true", help="print one reading and exit")
    top.add_argument("--json", action="store_true", help="print /admin/state.json as it is")
    top.add_argument(
        "--interval", type=float, default=1.0, help="seconds between readings (default 1)"
    )
    top.set_defaults(func=cmd_top)

    check = sub.add_parser(
        "check-config",
        help="validate the config (files it names must be readable) and print it, secrets redacted",
    )
    check.add_argument("--config", help="TOML file (also FANOUT_CONFIG)")
    check.add_argument("--demo", action="store_true", help="as `serve --demo` would run")
    check.set_defaults(func=cmd_check_config)

    token = sub.add_parser("token", help="print a development JWT")
    token.add_argument("--sub", required=True, help="the principal (claim 'sub')")
    token.add_argument(
        "--subjects",
        help="comma-separated patterns (claim 'subjects'); omitted: ws.subject_whitelist applies",
    )
    token.add_argument(
        "--requests",
        help="comma-separated patterns (claim 'requests'); the gateway allows its request"
        " whitelist ∩ these, so without it the token may make no requests",
    )
    token.add_argument(
        "--ttl",
        default="1h",
        help="lifetime, e.g. 90s, 15m, 1h, 24h (default 1h); the gateway refuses tokens"
        " living longer than jwt.max_lifetime_s (default 24h)",
    )
    token.add_argument("--key", required=True, help="private key PEM (RSA, EC P-256 or Ed25519)")
    token.add_argument("--kid", help="key id header, to pick the key from a JWKS")
    token.add_argument("--iss", help="issuer claim (match jwt.issuer)")
    token.add_argument("--aud", help="audience claim (match jwt.audience)")
    token.set_defaults(func=cmd_token)

    keygen = sub.add_parser("keygen", help="write a development key pair (private.pem, public.pem)")
    keygen.add_argument("--out", default=".", help="directory (default: the current one)")
    keygen.add_argument("--kind", default="rsa", choices=["rsa", "ec", "ed25519"])
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair")
    keygen.set_defaults(func=cmd_keygen)

    version = sub.add_parser("version", help="print the version and the protocol version")
    version.set_defaults(func=cmd_version)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
