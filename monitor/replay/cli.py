"""``inferwatch replay`` on the command line: arguments in, report files and a summary out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError

from monitor.errors import InferWatchError


def cmd_replay(args: argparse.Namespace) -> int:
    from monitor.cli import overrides
    from monitor.config import load_config
    from monitor.ops import logs
    from monitor.replay.kafka import parse_bound

    if not args.report and not args.html:
        raise InferWatchError("replay needs --report OUT.json, --html OUT.html or both")
    config = load_config(args.config, overrides(args))
    logs.setup(args.log_level, "text" if sys.stderr.isatty() else config.logging.format)
    start = parse_bound(args.start, "--from") if args.start else None
    end = parse_bound(args.end, "--to") if args.end else None
    if start is not None and end is not None and start.time is not None and end.time is not None \
            and end.time < start.time:
        raise InferWatchError("--to is before --from")
    playbooks = None if args.no_playbooks else config.respond.playbooks
    if playbooks is not None and not Path(playbooks).exists():
        raise InferWatchError(f"playbooks {playbooks}: no such file or directory (--no-playbooks replays without)")
    outputs = [p for p in (args.report, args.html, args.dead_letters) if p and p != "-"]
    created = [p for p in outputs if not Path(p).exists()]
    for path in outputs:  # before hours of reading: a report that cannot be written is a usage error
        _writable(path)
    try:
        return _replay(args, config, start, end, playbooks)
    except BaseException:
        for path in created:  # no empty report left behind to be taken for a result
            Path(path).unlink(missing_ok=True)
        raise


def _replay(args: argparse.Namespace, config: Any, start: Any, end: Any, playbooks: str | None) -> int:
    from monitor.replay.report import dumps
    from monitor.replay.run import Replay

    if args.dead_letters:
        Path(args.dead_letters).write_text("", encoding="utf-8")
    replay = Replay(config, inputs=args.input or (), topic=args.topic, start=start, end=end, models=args.model,
                    clients=args.client, playbooks=playbooks,
                    dead_letters=Path(args.dead_letters) if args.dead_letters else None, progress=sys.stderr)
    try:
        report = replay.run()
    except KafkaError as exc:
        raise InferWatchError(f"Kafka: {type(exc).__name__}: {exc} (is the broker up? --bootstrap)") from None
    text = dumps(report)
    if args.report == "-":
        sys.stdout.write(text)
    elif args.report:
        _write(args.report, text)
    if args.html:
        from monitor.replay.html import render

        _write(args.html, render(report))
    print(summary(report, args), file=sys.stderr)
    return 0


def summary(report: dict[str, Any], args: argparse.Namespace) -> str:
    events = report["events"]
    kinds: dict[str, int] = {}
    for d in report["detections"]:
        key = f"{d['model']}/{d['kind']}"
        kinds[key] = kinds.get(key, 0) + 1
    lines = [f"replayed {events['read']:,} messages: {events['processed']:,} events processed, "
             f"{events['filtered_out']:,} filtered out, {events['dead_lettered']:,} dead letters"
             + (f" ({', '.join(f'{r} {n}' for r, n in events['dead_letter_reasons'].items())})"
                if events["dead_letter_reasons"] else ""),
             "detections: " + (", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none")]
    if report["playbooks"] is not None:
        would = sum(1 for i in report["incidents"] for s in i["steps"] if s["state"] == "dry_run")
        lines.append(f"incidents: {len(report['incidents'])} (dry run: {would} steps would have run)")
    clients = report["suspicious_clients"]
    if clients:
        lines.append("suspicious clients: " + ", ".join(
            f"{c['client_id']} on {c['model']} ({', '.join(c['kinds'])})" for c in clients[:10])
            + (f" and {len(clients) - 10} more" if len(clients) > 10 else ""))
    written = [p for p in (args.report, args.html) if p and p != "-"]
    if written:
        lines.append("report: " + ", ".join(written))
    return "\n".join(lines)


def _writable(path: str) -> None:
    target = Path(path)
    if target.is_dir():
        raise InferWatchError(f"{path}: is a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise InferWatchError(f"{path}: cannot write there ({exc.strerror})") from None


def _write(path: str, text: str) -> None:
    from monitor.ops.state import atomic_file

    with atomic_file(Path(path), 0o644) as handle:  # never half a report, even when stopped
        handle.write(text.encode("utf-8"))
