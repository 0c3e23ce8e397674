"""Command line: ``fanout serve | check-config | token | keygen | version``.

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

from fanout import PROTOCOL_VERSION, __version__, settings

EXIT_CONFIG = 2


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "demo", False):
        out["demo.enabled"] = True
        out["ws.auth_required"] = False
        out["server.host"] = "127.0.0.1"
        if not ({"WS_REQUEST_WHITELIST", "FANOUT_REQUESTS_WHITELIST"} & set(os.environ)):
            out["requests.whitelist"] = ["svc.orders.>"]
    for flag, path in (
        ("workers", "server.workers"),
        ("host", "server.host"),
        ("port", "server.port"),
        ("log_level", "log.level"),
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

    logs.setup(cfg.log.level)
    side: list[Any] = []
    if cfg.demo.enabled:
        from fanout.demo import run_orders_service, run_publisher

        side.append(("demo-publisher", run_publisher))
        side.append(("demo-orders", run_orders_service))
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
    )
    return supervisor.run()


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_settings(args)
    print(json.dumps(settings.redacted(cfg), indent=2, sort_keys=True))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from fanout import devtoken

    try:
        ttl = devtoken.parse_ttl(args.ttl)
        key = Path(args.key).read_bytes()
        token = devtoken.make_token(
            private_key_pem=key,
            sub=args.sub,
            subjects=[s.strip() for s in args.subjects.split(",") if s.strip()],
            ttl_s=ttl,
            kid=args.kid,
            issuer=args.iss,
            audience=args.aud,
            requests=[s.strip() for s in (args.requests or "").split(",") if s.strip()],
        )
    except (OSError, ValueError) as exc:
        print(f"fanout token: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(token)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from fanout import devtoken

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    private, public = devtoken.generate_keypair(args.kind)
    priv_path = out / "private.pem"
    priv_path.write_bytes(private)
    os.chmod(priv_path, 0o600)
    (out / "public.pem").write_bytes(public)
    print(f"wrote {priv_path} and {out / 'public.pem'}")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"fanout {__version__} (protocol v{PROTOCOL_VERSION})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fanout", description="NATS -> WebSocket fan-out gateway")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the supervisor and its workers")
    serve.add_argument("--config", help="TOML file (also FANOUT_CONFIG)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="embedded NATS + demo publisher, anonymous read of xy.md.>, 127.0.0.1",
    )
    serve.add_argument("--workers", type=int, help="worker processes (default: one per CPU)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config")
    check.add_argument("--demo", action="store_true")
    check.set_defaults(func=cmd_check_config)

    token = sub.add_parser("token", help="print a development JWT")
    token.add_argument("--sub", required=True)
    token.add_argument("--subjects", default="", help="comma-separated patterns (claim 'subjects')")
    token.add_argument(
        "--requests",
        default="",
        help="comma-separated patterns (claim 'requests'); the gateway allows its request "
        "whitelist ∩ these, so without it the token may make no requests",
    )
    token.add_argument("--ttl", default="1h", help="e.g. 90s, 15m, 1h, 2d")
    token.add_argument("--key", required=True, help="private key PEM (RSA, EC P-256 or Ed25519)")
    token.add_argument("--kid")
    token.add_argument("--iss")
    token.add_argument("--aud")
    token.set_defaults(func=cmd_token)

    keygen = sub.add_parser("keygen", help="write a development key pair (private.pem, public.pem)")
    keygen.add_argument("--out", default=".")
    keygen.add_argument("--kind", default="rsa", choices=["rsa", "ec", "ed25519"])
    keygen.set_defaults(func=cmd_keygen)

    version = sub.add_parser("version")
    version.set_defaults(func=cmd_version)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
