"""The ``plantsight`` command line (DESIGN §8)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from shared.config import SERVICES, Config, ConfigError, demo_config, load_config


def _load(args) -> Config:
    """The config named on the command line; ``--redis-url`` wins over the file and the environment."""
    url = getattr(args, "redis_url", None)
    environ = {**os.environ, **({"PLANTSIGHT_REDIS__URL": url} if url else {})}
    if getattr(args, "demo", False):
        return demo_config(environ)
    return load_config(args.config, environ=environ)


def cmd_run(args) -> int:
    from shared.runtime import setup_logging

    cfg = _load(args)
    setup_logging(cfg.log_level, args.service)
    if args.service == "ingest":
        from services.ingest.service import IngestService as cls
    elif args.service == "preprocess":
        from services.preprocess.service import PreprocessService as cls
    elif args.service == "infer":
        from services.inference.service import InferService as cls
    elif args.service == "alert":
        from services.alerting.service import AlertService as cls
    else:
        raise SystemExit(f"plantsight run: service {args.service!r} is not available yet")
    kw = {"replica": args.replica, "port": args.port}
    if args.service == "infer" and args.task:
        kw["tasks"] = args.task
    return cls(cfg, **kw).run()


def cmd_up(args) -> int:
    from services.supervisor import say, up

    cfg = _load(args)
    run_args = ["--demo"] if args.demo else ["--config", args.config]
    say(f"{len(cfg.cameras)} camera(s): " + ", ".join(f"{c.id} ({'/'.join(c.tasks)}, {c.fps:g} fps)"
                                                   for c in cfg.cameras))
    return up(cfg, run_args, args.seconds, args.redis_url)


def cmd_config_check(args) -> int:
    cfg = load_config(args.file)
    print(yaml.safe_dump(cfg.masked(), sort_keys=False), end="")
    print(f"# {args.file}: OK ({len(cfg.cameras)} cameras, tasks: {', '.join(cfg.tasks()) or 'none'})", file=sys.stderr)
    return 0


def cmd_streams(args) -> int:
    from shared.streams import Names, connect, stream_stats

    cfg = _load(args)
    names = Names(cfg.redis.prefix)
    rows = stream_stats(connect(cfg.redis), names, cfg.tasks())
    if args.json:
        print(json.dumps({"streams": rows}))
        return 0
    print(f"{'stream':<40} {'group':<18} {'length':>8} {'lag':>6} {'pending':>8}")
    for r in rows:
        lag = "-" if r["lag"] is None else r["lag"]
        pend = "-" if r["pending"] is None else r["pending"]
        print(f"{r['stream']:<40} {r['group'] or '-':<18} {r['length']:>8} {lag:>6} {pend:>8}")
    return 0


def cmd_models(args) -> int:
    from shared.models import describe

    rows = describe()
    if args.json:
        print(json.dumps({"models": rows}))
        return 0
    print(f"{'arch':<18} {'task':<10} {'params':>12}  input -> output")
    for r in rows:
        print(f"{r['arch']:<18} {r['task']:<10} {r['params']:>12,}  {r['input']} -> {r['output']}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plantsight", description="Watch a process plant through its cameras.")
    sub = p.add_subparsers(dest="command", required=True)

    def config_args(sp, demo: bool = True):
        g = sp.add_mutually_exclusive_group(required=not demo)
        g.add_argument("--config", "-c", metavar="FILE", help="plantsight.yaml")
        if demo:
            g.add_argument("--demo", action="store_true", help="the built-in demo config (synthetic cameras)")
        sp.add_argument("--redis-url", metavar="URL", help="override redis.url")

    up = sub.add_parser("up", help="run every service locally, supervised")
    config_args(up)
    up.add_argument("--for", dest="seconds", type=float, metavar="SECONDS", help="stop after this long")
    up.set_defaults(fn=cmd_up)

    run = sub.add_parser("run", help="run one service")
    run.add_argument("service", choices=SERVICES)
    config_args(run)
    run.add_argument("--port", type=int, help="HTTP port (default: services.<name>.port)")
    run.add_argument("--replica", type=int, default=0, help=argparse.SUPPRESS)
    run.add_argument("--task", action="append", help="infer only: the task(s) this worker serves")
    run.set_defaults(fn=cmd_run)

    cfg = sub.add_parser("config", help="configuration tools")
    csub = cfg.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a config and print it with secrets masked")
    check.add_argument("file")
    check.set_defaults(fn=cmd_config_check)

    st = sub.add_parser("streams", help="length, lag, pending and dead letters of every stream")
    config_args(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_streams)

    mo = sub.add_parser("models", help="architectures with parameter counts and shapes")
    mo.add_argument("--json", action="store_true")
    mo.set_defaults(fn=cmd_models)

    from shared.training.commands import add_parsers  # synth, train, eval

    add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if getattr(args, "command", None) in ("up", "run", "streams") and not (args.config or args.demo):
        parser().error("give --config FILE or --demo")
    try:
        code = args.fn(args)
    except ConfigError as e:
        print(f"plantsight: configuration error\n{e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
