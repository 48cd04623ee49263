"""The ``plantsight`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import entry_points

import yaml

from shared.config import Config, ConfigError, demo_config, load_config
from shared.names import SERVICES, TASKS
from shared.secret import SecretError


def _load(args) -> Config:
    """The config named on the command line; ``--redis-url`` wins over the file and the environment."""
    url = getattr(args, "redis_url", None)
    environ = {**os.environ, **({"PLANTSIGHT_REDIS__URL": url} if url else {})}
    if getattr(args, "demo", False):
        return demo_config(environ)
    return load_config(args.config, environ=environ)


def cmd_run(args) -> int:
    from shared.logs import setup_logging

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
    elif args.service == "viewer":
        from services.viewer.service import ViewerService as cls
    else:
        raise SystemExit(f"plantsight run: service {args.service!r} is not available yet")
    kw = {"replica": args.replica, "port": args.port}
    if args.service == "infer" and args.task:
        kw["tasks"] = args.task
    if args.service == "viewer":
        from services.viewer.auth import TokenError

        try:
            return cls(cfg, **kw).run()
        except TokenError as e:
            raise SystemExit(f"plantsight run viewer: {e}") from None
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


def cmd_config_reference(args) -> int:
    from shared.config_reference import render

    print(render(), end="")
    return 0


def cmd_streams(args) -> int:
    from shared.keys import Keys
    from shared.streams.connection import connect
    from shared.streams.stats import stream_stats

    cfg = _load(args)
    rows = stream_stats(connect(cfg.redis), Keys.for_config(cfg), cfg.tasks())
    if args.json:
        print(json.dumps({"streams": rows}))
        return 0
    print(f"{'stream':<40} {'group':<18} {'length':>8} {'lag':>6} {'pending':>8}")
    for r in rows:
        lag = "-" if r["lag"] is None else r["lag"]
        pend = "-" if r["pending"] is None else r["pending"]
        print(f"{r['stream']:<40} {r['group'] or '-':<18} {r['length']:>8} {lag:>6} {pend:>8}")
    return 0


def cmd_alerts(args) -> int:
    """List recent alerts with their acknowledgement, or acknowledge one (``alerts ack ID``)."""
    import getpass
    import time

    from shared import acks
    from shared.keys import Keys
    from shared.messages import Alert, DecodeError
    from shared.streams.connection import connect

    cfg = _load(args)
    keys, r = Keys(cfg.redis.prefix), connect(cfg.redis)
    if getattr(args, "alerts_command", None) == "ack":
        try:
            record = acks.acknowledge(r, keys.prefix, args.id, args.by or getpass.getuser(), args.note or "",
                                      verdict=args.verdict)
        except acks.BadVerdict as e:
            print(f"plantsight alerts ack: {e}", file=sys.stderr)
            return 2
        except acks.UnknownAlert:
            print(f"plantsight alerts ack: no alert {args.id} on {keys.alerts}", file=sys.stderr)
            return 1
        print(json.dumps({"id": args.id, **record}))
        return 0
    done = acks.acknowledgements(r, keys.prefix)
    rows = []
    for entry_id, fields in reversed(r.xrevrange(keys.alerts, count=args.n)):
        try:
            a = Alert.from_msgpack(fields.get(b"m", b""))
        except DecodeError:
            continue
        ack = done.get(a.id) or done.get(a.labels.get("episode", ""))
        rows.append({**{k: v for k, v in a.to_dict().items() if k != "v"}, "entry": entry_id.decode(), "acked": ack})
    if args.json:
        print(json.dumps({"alerts": rows}))
        return 0
    print(f"{'id':<36} {'time (UTC)':<19} {'state':<8} {'severity':<8} {'rule':<20} {'camera':<14} {'value':>9}  "
          f"{'verdict':<11}  acked")
    for a in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a["ts"] / 1e9))
        acked = f"by {a['acked']['by']}" if a["acked"] else "-"
        verdict = (a["acked"] or {}).get("verdict") or "-"
        print(f"{a['id']:<36} {when:<19} {a['state']:<8} {a['severity']:<8} {a['rule']:<20} {a['camera']:<14} "
              f"{a['value']:>9.6g}  {verdict:<11}  {acked}")
    return 0


def cmd_dataset_export(args) -> int:
    """Judged alerts' frames as a training set of their task (shared/dataset_export.py)."""
    from shared.dataset_export import ExportError, export, parse_since
    from shared.streams.connection import connect

    cfg = _load(args)
    try:
        since = parse_since(args.since)
        summary = export(connect(cfg.redis), cfg.redis.prefix, args.task, since, args.out,
                         negative_class=args.negative_class, max_message_bytes=cfg.streams.max_message_bytes)
    except ExportError as e:
        print(f"plantsight dataset export: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"plantsight dataset export: cannot write into {args.out}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
        return 0
    for gone in summary["missing"]:
        print(f"without evidence: {gone['id']}: {gone['reason']}")
    print(f"{summary['task']} -> {summary['out']}: added {summary['added']}, already there {summary['already']}, "
          f"without evidence {summary['without_evidence']}")
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


def _models_target(args, command: str):
    """(config, Redis, keys) for a command that talks to the running infer workers; None: usage error."""
    from shared.keys import Keys
    from shared.streams.connection import connect

    if not (args.config or args.demo):
        print(f"plantsight models {command}: give --config FILE or --demo", file=sys.stderr)
        return None
    cfg = _load(args)
    return cfg, connect(cfg.redis), Keys(cfg.redis.prefix)


def _check_model_dir(command: str, task: str, directory: str):
    """(the resolved path, its model.json) when ``directory`` holds a model of ``task``; None after saying why."""
    from pathlib import Path

    from shared.models.modeldir import load_meta
    from shared.models.registry import ModelError

    path = Path(directory).resolve()
    try:
        meta = load_meta(path)
    except ModelError as e:
        print(f"plantsight models {command}: {e}", file=sys.stderr)
        return None
    if meta.task != task:
        print(f"plantsight models {command}: {path} holds a {meta.task} model, not a {task} one", file=sys.stderr)
        return None
    return path, meta


def _wait_for_record(task: str, read, match, wait: float) -> int:
    """Wait up to ``wait`` s for one of the JSON records ``read()`` returns that ``match`` accepts; print it.
    Exit status: 0 when it came and names no refusal or failure, 1 otherwise (0 when not asked to wait)."""
    import time

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        for raw in read():
            rec = json.loads(raw) if raw else {}
            if match(rec):
                print(json.dumps({"task": task, **rec}))
                return 1 if rec.get("refused") or rec.get("state") in ("refused", "failed") else 0
        time.sleep(0.2)
    return 0 if not wait else 1


def _deploy(r, keys, task: str, path, wait: float) -> int:
    """Ask the running infer workers to switch ``task`` to ``path`` (``{P}:models:deploy``), the hot swap."""
    import time

    asked = time.time()
    r.hset(keys.models_deploy, task, json.dumps({"path": str(path), "at": asked}))
    return _wait_for_record(task, lambda: [r.hget(keys.models_active, task)],
                            lambda rec: rec.get("path") == str(path) and rec.get("at", 0) >= asked, wait)


def cmd_models_deploy(args) -> int:
    """Check a model directory and ask the running infer workers to switch to it (``{P}:models:deploy``)."""
    target = _models_target(args, "deploy")
    if target is None:
        return 2
    _, r, keys = target
    checked = _check_model_dir("deploy", args.task, args.dir)
    if checked is None:
        return 1
    path, meta = checked
    print(f"{args.task}: asked infer to run {meta.arch}@{meta.version} from {path}", file=sys.stderr)
    return _deploy(r, keys, args.task, path, args.wait)


def _shadow_asked(cfg, r, keys, task: str) -> str | None:
    """The shadow model directory a task runs: the one ``models shadow`` set, else the config's."""
    raw = r.hget(keys.models_shadow, task)
    if raw:
        try:
            path = json.loads(raw)["path"]
            return None if path is None else str(path)
        except (ValueError, KeyError, TypeError):
            return None
    spec = cfg.model(task)
    return str(spec.shadow) if spec.shadow else None


def cmd_models_shadow(args) -> int:
    """Set (or with ``--off`` remove) a task's shadow model in ``{P}:models:shadow``, which infer watches as it
    watches ``{P}:models:deploy``."""
    import time

    target = _models_target(args, "shadow")
    if target is None:
        return 2
    _, r, keys = target
    if args.off == (args.dir is not None):
        print("plantsight models shadow: give a model directory or --off", file=sys.stderr)
        return 2
    if args.share is not None and not 0 < args.share <= 1:
        print(f"plantsight models shadow: --share {args.share:g}: give a fraction above 0, at most 1",
              file=sys.stderr)
        return 2
    asked = time.time()
    if args.off:  # an explicit null, so that a shadow in the config is off too
        r.hset(keys.models_shadow, args.task, json.dumps({"path": None, "at": asked}))
        print(f"{args.task}: asked infer to stop the shadow model", file=sys.stderr)
        return 0
    checked = _check_model_dir("shadow", args.task, args.dir)
    if checked is None:
        return 1
    path, meta = checked
    r.hset(keys.models_shadow, args.task, json.dumps({"path": str(path), "share": args.share, "at": asked}))
    print(f"{args.task}: asked infer to run {meta.arch}@{meta.version} from {path} as a shadow", file=sys.stderr)
    return _wait_for_record(args.task, lambda: r.hgetall(keys.models_shadow_state).values(),
                            lambda rec: rec.get("task") == args.task and rec.get("path") == str(path)
                            and rec.get("at", 0) >= asked, args.wait)


def cmd_models_promote(args) -> int:
    """Make a task's shadow model its live model through the hot swap, and clear the shadow."""
    import time

    target = _models_target(args, "promote")
    if target is None:
        return 2
    cfg, r, keys = target
    shadow = _shadow_asked(cfg, r, keys, args.task)
    if shadow is None:
        print(f"plantsight models promote: {args.task} has no shadow model", file=sys.stderr)
        return 1
    checked = _check_model_dir("promote", args.task, shadow)
    if checked is None:
        return 1
    path, meta = checked
    r.hset(keys.models_shadow, args.task, json.dumps({"path": None, "at": time.time()}))
    print(f"{args.task}: asked infer to run the shadow {meta.arch}@{meta.version} from {path} as the live model",
          file=sys.stderr)
    return _deploy(r, keys, args.task, path, args.wait)


def cmd_models_import(args) -> int:
    """Turn an ONNX or TorchScript file into a model directory the pipeline loads (``shared.models.imported``)."""
    from shared.models.imported import import_model
    from shared.models.registry import ModelError

    norm = args.normalisation
    if norm and "/" in norm:
        try:
            mean, std = ([float(v) for v in part.split(",")] for part in norm.split("/"))
        except ValueError:
            print(f"plantsight models import: --normalisation {norm!r}: give imagenet, unit or "
                  "MEAN,MEAN,MEAN/STD,STD,STD", file=sys.stderr)
            return 2
        norm = {"mean": mean, "std": std}
    try:
        meta = import_model(args.file, args.task, args.out, names=args.names, input_size=args.input_size,
                            normalisation=norm, layout=args.layout)
    except ModelError as e:
        print(f"plantsight models import: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {meta.task} model {meta.arch}@{meta.version} ({meta.format}, layout {meta.layout}, "
          f"{len(meta.classes)} classes, input {meta.input_size[0]}x{meta.input_size[1]})", file=sys.stderr)
    print(json.dumps({"dir": str(args.out), "task": meta.task, "model": f"{meta.arch}@{meta.version}",
                      "format": meta.format, "layout": meta.layout, "classes": meta.classes,
                      "input_size": list(meta.input_size), "normalisation": meta.normalisation}))
    return 0


def cmd_bench(args) -> int:
    # bench sits above the services: it is found through its entry point, never imported from here.
    found = entry_points(group="plantsight.commands", name="bench")
    if not found:
        print("plantsight bench: the benchmarks are not installed (pip install -e . from a source checkout)",
              file=sys.stderr)
        return 2
    return next(iter(found)).load()(args.bench_args)


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
    ref = csub.add_parser("reference", help="every config key as Markdown (docs/configuration.md is its output)")
    ref.set_defaults(fn=cmd_config_reference)

    st = sub.add_parser("streams", help="length, lag, pending and dead letters of every stream")
    config_args(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_streams)

    al = sub.add_parser("alerts", help="recent alerts and their acknowledgements; 'alerts ack ID' acknowledges")
    config_args(al)
    al.add_argument("--json", action="store_true")
    al.add_argument("-n", type=int, default=50, metavar="N", help="the newest N alerts (default 50)")
    al.set_defaults(fn=cmd_alerts)
    alsub = al.add_subparsers(dest="alerts_command")
    ack = alsub.add_parser("ack", help="acknowledge an alert: its episode is not re-notified until it resolves")
    ack.add_argument("id", help="the alert id (plantsight alerts lists them)")
    ack.add_argument("--by", metavar="NAME", help="who acknowledges (default: the login name)")
    ack.add_argument("--note", metavar="TEXT", help="a short note kept with the acknowledgement")
    ack.add_argument("--verdict", metavar="VERDICT",
                     help="the operator's judgement, confirmed or false_alarm; it may be added to an earlier "
                          "acknowledgement that has none, and is not changed once given")
    g = ack.add_mutually_exclusive_group()  # SUPPRESS: given before 'ack' (alerts --demo ack ID) they still count
    g.add_argument("--config", "-c", metavar="FILE", default=argparse.SUPPRESS, help="plantsight.yaml")
    g.add_argument("--demo", action="store_true", default=argparse.SUPPRESS, help="the built-in demo config")
    ack.add_argument("--redis-url", metavar="URL", default=argparse.SUPPRESS, help="override redis.url")
    ack.set_defaults(fn=cmd_alerts)

    ds = sub.add_parser("dataset", help="training data from the pipeline: 'dataset export' writes judged alerts")
    dsub = ds.add_subparsers(dest="dataset_command", required=True)
    dx = dsub.add_parser("export", help="the frames of alerts operators gave a verdict, in the layout "
                                        "'plantsight train' reads for their task, with manifest.json; a re-run "
                                        "adds only alerts not yet in the manifest")
    config_args(dx)
    dx.add_argument("--task", required=True, choices=TASKS,
                    help="the alerts' task: classify, detect or segment (thermal has no export layout)")
    dx.add_argument("--since", required=True, metavar="WHEN",
                    help="alerts raised since: a duration back from now (24h, 7d, 30m) or an ISO date/time (UTC)")
    dx.add_argument("--out", required=True, metavar="DIR", help="the dataset folder (created, or added to)")
    dx.add_argument("--negative-class", default="normal", metavar="NAME",
                    help="classify: the class folder of false alarms (default: normal); a confirmed alert goes "
                         "under the class the model said")
    dx.add_argument("--json", action="store_true", help="print the summary as JSON")
    dx.set_defaults(fn=cmd_dataset_export)

    mo = sub.add_parser("models", help="architectures with parameter counts and shapes; deploy, shadow or promote "
                                       "a model")
    mo.add_argument("--json", action="store_true")
    mo.set_defaults(fn=cmd_models)
    msub = mo.add_subparsers(dest="models_command")
    dep = msub.add_parser("deploy", help="switch a running pipeline's task to a model directory (no downtime)")
    dep.add_argument("task", choices=TASKS)
    dep.add_argument("dir", help="model directory (model.json beside model.pt, model.onnx or model.ts)")
    config_args(dep)
    dep.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                     help="wait this long for infer to report the switch (or the refusal)")
    dep.set_defaults(fn=cmd_models_deploy)
    sh = msub.add_parser("shadow", help="run a candidate model beside a task's live model on the same frames, its "
                                        "results kept apart from alerting; --off stops it")
    sh.add_argument("task", choices=TASKS)
    sh.add_argument("dir", nargs="?", help="model directory of the candidate")
    sh.add_argument("--off", action="store_true", help="stop the task's shadow model (also one in the config)")
    sh.add_argument("--share", type=float, metavar="FRACTION",
                    help="of the task's frames the shadow runs on, above 0 and at most 1 (default: the config's "
                         "models.<task>.shadow_share, 1.0)")
    config_args(sh)
    sh.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                    help="wait this long for infer to report the shadow running (or refused)")
    sh.set_defaults(fn=cmd_models_shadow)
    pro = msub.add_parser("promote", help="make a task's shadow model its live model (no downtime) and clear the "
                                          "shadow")
    pro.add_argument("task", choices=TASKS)
    config_args(pro)
    pro.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                     help="wait this long for infer to report the switch (or the refusal)")
    pro.set_defaults(fn=cmd_models_promote)
    imp = msub.add_parser("import", help="turn an ONNX or TorchScript file (an Ultralytics YOLO export, say) into "
                                         "a model directory")
    imp.add_argument("file", help="the model file (.onnx, or TorchScript saved by torch.jit.save)")
    imp.add_argument("--task", required=True, choices=TASKS)
    imp.add_argument("--out", required=True, metavar="DIR", help="the model directory to write")
    imp.add_argument("--names", nargs="+", metavar="NAME", help="class names, in the network's order "
                                                                "(default: the file's own, else class0, class1, …)")
    imp.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                     help="the network's input size (default: the file's own)")
    imp.add_argument("--normalisation", metavar="N",
                     help="imagenet, unit (pixels/255) or MEAN,MEAN,MEAN/STD,STD,STD (default: unit for Ultralytics "
                          "files, else imagenet)")
    imp.add_argument("--layout", help="what the output holds (default: worked out from the file; docs/models.md)")
    imp.set_defaults(fn=cmd_models_import)

    be = sub.add_parser("bench",
                        help="benchmarks: pipeline, transport, ingest, engines, soak, quality (JSON on stdout)",
                        add_help=False)
    be.add_argument("bench_args", nargs=argparse.REMAINDER)
    be.set_defaults(fn=cmd_bench)

    from shared.training.commands import add_parsers  # synth, train, eval

    add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    needs_config = ("up", "run", "streams", "alerts", "dataset")
    if getattr(args, "command", None) in needs_config and not (args.config or args.demo):
        parser().error("give --config FILE or --demo")
    try:
        code = args.fn(args)
    except (ConfigError, SecretError) as e:
        print(f"plantsight: configuration error\n{e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
