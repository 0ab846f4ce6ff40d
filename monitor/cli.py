"""The ``inferwatch`` command: run the daemon, check a config, run the demo.

Exit codes: 0 success, 1 unexpected failure (a bug; see the log), 2 a usage or config error, 130
stopped by a second signal.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

from monitor import __version__
from monitor.errors import InferWatchError

log = logging.getLogger("inferwatch")

EPILOG = """\
examples:
  inferwatch run -c configs/inferwatch.yaml                  consume from Kafka as configured
  inferwatch run -c configs/inferwatch.yaml --bootstrap kafka:9092 --group ml-watch
  inferwatch run -c configs/inferwatch.yaml --input logs/*.jsonl.gz --output detections.jsonl
  inferwatch check -c configs/inferwatch.yaml                validate a config and its playbooks (exit 2 when invalid)
  inferwatch run -c configs/inferwatch.yaml --stage respond  run only the playbooks, on the detections topic
  inferwatch playbooks test -p playbooks --detection d.json  which playbooks match, which steps would run
  inferwatch pending                                         steps awaiting approval (INFERWATCH_ADMIN_TOKEN)
  inferwatch approve INCIDENT STEP --by alice                approve one (reject: the same with reject)
  inferwatch status                                          models watched, detectors' phases, what fired
  inferwatch status -c configs/inferwatch.yaml --json        the same offline, from the state directory
  inferwatch register export --format csv -o register.csv    the risk register for an audit
  inferwatch replay -c configs/inferwatch.yaml --input logs/*.jsonl.gz --report r.json --html r.html
  inferwatch replay -c configs/inferwatch.yaml --topic inference-logs --client mallory --report r.json \\
                    --from 2025-11-27T08:00:00Z --to 2025-11-27T09:00:00Z   forensics on Kafka's history
  inferwatch demo --write traffic.jsonl.gz                   the demo's traffic as a file, to replay
  inferwatch demo --duration 60                              everything on an embedded broker

docs: README.md; metrics at http://HOST:9108/metrics (port: http.port or --http-port)
"""


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help="config file (YAML); defaults apply without one")
    p.add_argument("--bootstrap", metavar="HOST:PORT[,HOST:PORT]", help="override kafka.bootstrap_servers")
    p.add_argument("--topic", metavar="NAME", help="override kafka.topics.logs (the topic to watch)")
    p.add_argument("--group", metavar="ID", help="override kafka.group_id (the consumer group)")
    p.add_argument("--http-port", metavar="PORT", type=int, help="override http.port (0 picks a free port)")
    p.add_argument("--state-dir", metavar="DIR", help="override state.dir (checkpoints, spool)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override logging.level")
    p.add_argument("--log-format", choices=["json", "text"], help="override logging.format")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "bootstrap", None):
        out["kafka.bootstrap_servers"] = [s.strip() for s in args.bootstrap.split(",") if s.strip()]
    if getattr(args, "topic", None):
        out["kafka.topics.logs"] = args.topic
    if getattr(args, "group", None):
        out["kafka.group_id"] = args.group
    if getattr(args, "http_port", None) is not None:
        out["http.port"] = args.http_port
    if getattr(args, "state_dir", None):
        out["state.dir"] = args.state_dir
    if getattr(args, "log_level", None):
        out["logging.level"] = args.log_level
    if getattr(args, "log_format", None):
        out["logging.format"] = args.log_format
    if getattr(args, "playbooks", None):
        out["respond.playbooks"] = args.playbooks
    if getattr(args, "dry_run", False):
        out["respond.dry_run"] = True
    return out


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="inferwatch",
        description="Runtime security monitor for deployed ML models: reads inference logs from Kafka\n"
                    "(or files), runs online detectors per model (today: drift of every feature, the feature\n"
                    "vector, confidence, latency, cost, class shares and error rate against a reference;\n"
                    "low-confidence surges per model and per client; per client, model extraction, black-box\n"
                    "adversarial search and query floods; cost regressions per model version, expensive\n"
                    "(sponge) clients, oversized payloads, error spikes and the model servers' own gauges;\n"
                    "a saved alibi-detect detector) and publishes detections, with bad input sent to a\n"
                    "dead-letter topic. Detections run YAML incident playbooks (Slack, PagerDuty,\n"
                    "Alertmanager, webhooks, Kubernetes isolate/rollback, client blocks, evidence snapshots)\n"
                    "with dedup, budgets, dry runs, approvals and a crash-safe journal. Periodic jobs\n"
                    "(checkpoints, idle-client eviction, baseline refresh, scraping model servers' /metrics)\n"
                    "run on APScheduler.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"inferwatch {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon (detect and respond stages) on Kafka or on files",
                         description="Consume inference logs in a consumer group, run the detectors, publish "
                                     "detections and dead letters, commit offsets once they are durable; with "
                                     "respond.playbooks set (or -p), run the playbooks on the detections topic "
                                     "in a consumer group of their own. With --input, read JSONL/JSONL.gz "
                                     "files (or - for stdin) instead, and hand detections to the playbooks "
                                     "directly.")
    _add_overrides(run)
    run.add_argument("--input", metavar="FILE", nargs="+",
                     help="read events from files (JSONL, JSONL.gz, globs, - for stdin) instead of Kafka; "
                          "a file run serves HTTP and keeps detector state only with --http-port / --state-dir")
    run.add_argument("--output", metavar="FILE",
                     help="with --input: write detections as JSON lines here (default: stdout)")
    run.add_argument("--dead-letters", metavar="FILE",
                     help="with --input: write dead letters here (default: STATE_DIR/dead-letters.jsonl)")
    run.add_argument("--stage", choices=["all", "detect", "respond"], default="all",
                     help="all (default): detect, and respond when respond.playbooks is set; detect: no "
                          "playbooks; respond: only the playbooks, fed by the detections topic")
    run.add_argument("-p", "--playbooks", metavar="DIR", help="override respond.playbooks (a directory of YAML)")
    run.add_argument("--dry-run", action="store_true",
                     help="playbooks show the steps they would run and run none (respond.dry_run)")

    replay = sub.add_parser(
        "replay", help="run the detectors and the playbooks (dry run) over history; write a forensic report",
        description="Reads history from files (--input) or a Kafka topic (--topic, without a consumer group: "
                    "no live group's offsets move), runs the same detectors on event time and matches the "
                    "playbooks in a dry run (cooldowns and quiet periods in event time), and writes a JSON "
                    "report (detections, what each playbook step would have done, figures over time, input "
                    "digests) and optionally a self-contained HTML report. The same inputs and config give "
                    "the same report, byte for byte. A progress bar shows on a terminal.")
    replay.add_argument("-c", "--config", metavar="FILE", help="config file (YAML): detectors, playbooks, Kafka")
    source = replay.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="FILE", nargs="+",
                        help="JSONL or JSONL.gz files, globs, - for stdin (read in the order given)")
    source.add_argument("--topic", metavar="NAME", help="a Kafka topic (the config's brokers, or --bootstrap)")
    replay.add_argument("--bootstrap", metavar="HOST:PORT[,HOST:PORT]", help="override kafka.bootstrap_servers")
    replay.add_argument("--from", dest="start", metavar="WHEN",
                        help="start: RFC 3339 (2025-11-27T08:00:00Z), epoch seconds, or with --topic offsets "
                             "per partition (0:1200,1:1180); inclusive")
    replay.add_argument("--to", dest="end", metavar="WHEN", help="end, as --from; inclusive")
    replay.add_argument("--model", metavar="NAME", action="append", default=[],
                        help="only this model (a glob; repeat for more)")
    replay.add_argument("--client", metavar="ID", action="append", default=[],
                        help="only this client's events (a glob; repeat for more)")
    replay.add_argument("-p", "--playbooks", metavar="DIR",
                        help="playbooks to match (default: respond.playbooks of the config)")
    replay.add_argument("--no-playbooks", action="store_true", help="detections only")
    replay.add_argument("--report", metavar="OUT.json", help="write the JSON report here (- for stdout)")
    replay.add_argument("--html", metavar="OUT.html", help="write the HTML report here")
    replay.add_argument("--dead-letters", metavar="FILE", help="write the dead letters here (JSON lines)")
    replay.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default="WARNING",
                        help="log level (default WARNING: the progress bar and the summary say the rest)")

    check = sub.add_parser("check", help="validate a config file and its playbooks; exit 2 with the reason "
                                         "when invalid")
    check.add_argument("-c", "--config", metavar="FILE", help="config file to check")
    check.add_argument("-p", "--playbooks", metavar="DIR", help="playbooks to check (default: respond.playbooks)")

    books = sub.add_parser("playbooks", help="work with playbooks offline (test against a detection)")
    books_sub = books.add_subparsers(dest="playbooks_command", metavar="SUBCOMMAND")
    test = books_sub.add_parser(
        "test", help="show which playbooks match a detection and which steps would run",
        description="Loads the playbooks as the daemon would (secrets not needed: shown as ***), matches the "
                    "detection (a JSON object as in DESIGN §3, or a JSON line of the detections topic) and "
                    "prints, per matching playbook, its dedup key and each step: would run, skipped (its when), "
                    "awaits approval, with the parameters rendered. Nothing is sent or changed.")
    test.add_argument("-p", "--playbooks", metavar="DIR", required=True, help="playbook directory or file")
    test.add_argument("--detection", metavar="FILE.json", required=True, help="the detection (- for stdin)")

    for name, text in (("pending", "list the playbook steps awaiting approval in a running daemon"),
                       ("approve", "approve a step awaiting approval in a running daemon"),
                       ("reject", "reject a step awaiting approval (the incident's remaining steps are aborted)")):
        cmd = sub.add_parser(name, help=text, description=text + ", through its admin endpoint; the bearer "
                             "token comes from the environment (INFERWATCH_ADMIN_TOKEN or --token-env).")
        if name != "pending":
            cmd.add_argument("incident", help="the incident id (inferwatch pending lists them)")
            cmd.add_argument("step", help="the step id")
            cmd.add_argument("--by", metavar="NAME", default=None, help="who decides (recorded in the journal)")
        cmd.add_argument("--url", metavar="URL", default="http://127.0.0.1:9108",
                         help="the daemon's HTTP address (default http://127.0.0.1:9108)")
        cmd.add_argument("--token-env", metavar="VAR", default="INFERWATCH_ADMIN_TOKEN",
                         help="environment variable holding the admin token (default INFERWATCH_ADMIN_TOKEN)")

    # The operator surface (monitor.ops.status_cli).
    from monitor.ops.status_cli import add_source_arguments

    status = sub.add_parser(
        "status", help="what is watched and where it stands: models, versions, detectors, detections, incidents",
        description=textwrap.fill("A table of every model and version the daemon has seen (events, distinct clients, first "
                    "and last seen), its detectors' phases (learning its reference, armed, alarming: a "
                    "detection within the detector's cooldown), its last detection and its open incidents. "
                    "Asks a running daemon (GET /api/models with the admin token from the environment) or reads "
                    "the state directory offline (-c CONFIG or --state-dir DIR).", 100),
        epilog="examples:\n  INFERWATCH_ADMIN_TOKEN=... inferwatch status --url http://inferwatch:9108\n"
               "  inferwatch status -c configs/inferwatch.yaml --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(status)
    status.add_argument("--json", action="store_true", help="print the inventory as JSON (as GET /api/models)")
    register = sub.add_parser("register", help="the risk register: detections by ATLAS/OWASP technique, incidents")
    register_sub = register.add_subparsers(dest="register_command", metavar="SUBCOMMAND")
    export = register_sub.add_parser(
        "export", help="write the risk register as CSV or JSON, for an audit",
        description=textwrap.fill("Per model: detections per UTC day, version, detector, kind and severity with their MITRE "
                    "ATLAS techniques and OWASP ML Top 10 entries, and every incident with the steps its "
                    "playbook ran (the journal's, and those the register kept after the journal forgot them). "
                    "JSON adds totals per technique and day. Asks a running daemon (GET /api/register) or reads "
                    "the state directory offline (-c CONFIG or --state-dir DIR).", 100),
        epilog="examples:\n  inferwatch register export --format csv -o register.csv\n"
               "  inferwatch register export -c configs/inferwatch.yaml --format json > register.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(export)
    export.add_argument("--format", choices=["csv", "json"], default="json", help="csv or json (default json)")
    export.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")

    demo = sub.add_parser("demo", help="run the whole flow on an embedded broker with a real model's traffic",
                          description="Starts the embedded Kafka-protocol broker (unless --bootstrap is given), "
                                      "streams traffic of a scikit-learn model with injected incidents (a drift, "
                                      "a probing client, a latency spike, malformed messages), runs the daemon "
                                      "and prints detections as they happen.")
    demo.add_argument("--bootstrap", metavar="HOST:PORT", help="use this broker instead of starting one")
    demo.add_argument("--duration", type=_positive, default=60.0, metavar="SECONDS",
                      help="stop after this long (default 60)")
    demo.add_argument("--rate", type=_positive, default=2000.0, metavar="EVENTS/S",
                      help="traffic rate (default 2000)")
    demo.add_argument("--http-port", type=int, default=9108, metavar="PORT",
                      help="metrics port (default 9108; 0 picks a free one)")
    demo.add_argument("--state-dir", metavar="DIR", help="state directory (default: a temporary one)")
    demo.add_argument("--write", metavar="FILE.jsonl[.gz]",
                      help="write the traffic (in simulated time, the same every time) to a file instead, to "
                           "try inferwatch replay or run --input on it")
    return top


# Each command's handler, imported when it runs so that `inferwatch status` does not load the detectors.
HANDLERS = {
    "check": ("monitor.cli", "cmd_check"),
    "run": ("monitor.cli", "cmd_run"),
    "replay": ("monitor.replay.cli", "cmd_replay"),
    "demo": ("monitor.demo.run", "run_demo"),
    "playbooks": ("monitor.respond.cli", "cmd_playbooks_test"),
    "pending": ("monitor.respond.cli", "cmd_admin"),
    "approve": ("monitor.respond.cli", "cmd_admin"),
    "reject": ("monitor.respond.cli", "cmd_admin"),
    "status": ("monitor.ops.status_cli", "cmd_status"),
    "register": ("monitor.ops.status_cli", "cmd_register_export"),
}
# Commands with one sub-command: the sub-command and the usage printed when it is missing.
SUBCOMMANDS = {
    "playbooks": ("test", "inferwatch playbooks test -p DIR --detection FILE.json"),
    "register": ("export", "inferwatch register export [--format csv|json] [-o FILE]"),
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_usage(sys.stderr)
        print("inferwatch: error: a command is needed: run, replay, check, demo, playbooks, pending, approve, "
              "reject, status or register (inferwatch --help explains them)", file=sys.stderr)
        return 2
    if args.command in SUBCOMMANDS:
        expected, usage = SUBCOMMANDS[args.command]
        if getattr(args, f"{args.command}_command") != expected:
            print(f"inferwatch: error: {usage}", file=sys.stderr)
            return 2
    module, name = HANDLERS[args.command]
    try:
        return getattr(importlib.import_module(module), name)(args)
    except InferWatchError as exc:
        print(f"inferwatch: error: {exc}", file=sys.stderr)
        return 2


def cmd_check(args: argparse.Namespace) -> int:
    from monitor.config import load_config
    from monitor.sources.kafka import missing_environment

    if not args.config and not args.playbooks:
        raise InferWatchError("check needs -c CONFIG, -p PLAYBOOKS or both")
    config = load_config(args.config, overrides(args))
    if args.config:
        for key, name in missing_environment(config):
            print(f"{args.config}: warning: $.kafka.security.{key} needs ${{{name}}}, which is not set here "
                  "(the daemon refuses to start without it)", file=sys.stderr)
        detectors = ", ".join(config.detectors) or "none"
        print(f"{args.config}: ok (watching {', '.join(config.models.watch)}; detectors: {detectors}; "
              f"logs topic {config.kafka.topics.logs} on {','.join(config.kafka.bootstrap_servers)})")
    if config.respond.playbooks is not None:
        from monitor.respond.cli import check_playbooks

        check_playbooks(config.respond.playbooks, config.respond.dry_run)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from monitor.config import load_config
    from monitor.daemon import DetectDaemon
    from monitor.ops import logs

    config = load_config(args.config, overrides(args))
    logs.setup(config.logging.level, config.logging.format)
    if (args.output or args.dead_letters) and not args.input:
        raise InferWatchError("--output and --dead-letters go with --input (with Kafka, outputs go to topics)")
    detections_out = None
    if args.input:
        from monitor.sources.files import expand_inputs

        expand_inputs(args.input)  # before --output is opened (and emptied): a typo must not cost a file
        detections_out = _open_for_writing(args.output, "--output") if args.output else sys.stdout
    dead_letters = Path(args.dead_letters) if args.dead_letters else Path(config.state.dir) / "dead-letters.jsonl"
    if args.input:
        _open_for_writing(str(dead_letters), "--dead-letters", mode="a").close()
    # A file run is a batch job: it serves HTTP and keeps detector state only when asked to
    # (--http-port, --state-dir), so it runs beside a daemon and gives the same result twice.
    file_run = bool(args.input)
    if args.stage == "respond" and args.input:
        raise InferWatchError("--stage respond reads the detections topic; --input feeds the detect stage")
    daemon = DetectDaemon(config, inputs=args.input, detections_out=detections_out, dead_letters_out=dead_letters,
                          http=not file_run or args.http_port is not None,
                          checkpoints=not file_run or args.state_dir is not None, stage=args.stage)
    daemon.install_signal_handlers()
    return daemon.run()


def _open_for_writing(path: str, flag: str, mode: str = "w") -> Any:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, mode, encoding="utf-8")
    except OSError as exc:
        raise InferWatchError(f"{flag} {path}: cannot write there ({exc.strerror})") from None
