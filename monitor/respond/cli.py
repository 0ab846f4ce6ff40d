"""The respond stage's commands: ``playbooks test``, the playbook part of ``check``, and ``pending`` /
``approve`` / ``reject`` (clients of a running daemon's admin endpoint)."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from monitor.errors import InferWatchError
from monitor.respond import playbooks as pb
from monitor.respond.delivery import RefuseRedirects


def check_playbooks(directory: str, dry_run: bool = False) -> pb.PlaybookSet:
    """Validate like the daemon, without needing the secrets; warn for each one the daemon will need."""
    books = pb.load(directory, require_env=False)
    needed: dict[str, list[str]] = {}
    if not dry_run:
        for book in books.playbooks:
            if book.spec.dry_run:
                continue
            for step in book.steps:
                for name in pb._missing_env(step.spec.with_):
                    needed.setdefault(name, []).append(f"{book.name}/{step.id}")
    for name, where in sorted(needed.items()):
        print(f"{directory}: warning: ${{{name}}} is not set here ({', '.join(where)}); the daemon refuses to start "
              "without it unless the playbook runs dry", file=sys.stderr)
    summary = ", ".join(f"{b.name} ({len(b.steps)} steps{', dry run' if b.spec.dry_run else ''})"
                        for b in books.playbooks) or "none"
    print(f"{directory}: ok ({len(books.playbooks)} playbooks: {summary})")
    return books


def _read_detection(path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as exc:
        raise InferWatchError(f"--detection {path}: cannot read ({exc.strerror})") from None
    try:
        detection = json.loads(text)
    except ValueError as exc:
        raise InferWatchError(f"--detection {path}: not JSON ({exc})") from None
    if not isinstance(detection, dict):
        raise InferWatchError(f"--detection {path}: expected a JSON object (a detection, DESIGN §3)")
    for key in ("detector", "kind", "model"):
        if key not in detection:
            raise InferWatchError(f"--detection {path}: the detection has no {key!r}")
    detection.setdefault("detection_id", "test")
    detection.setdefault("severity", "warning")
    return detection


def cmd_playbooks_test(args: Any) -> int:
    books = pb.load(args.playbooks, require_env=False)
    detection = _read_detection(args.detection)
    matching = books.matching(detection)
    print(f"{len(books.playbooks)} playbooks loaded from {args.playbooks}; "
          f"{len(matching)} match {detection['detector']}/{detection['kind']} on {detection['model']}"
          + (f" by {detection['client_id']}" if detection.get("client_id") else ""))
    for book in books.playbooks:
        if book not in matching:
            print(f"\n- {book.name}: no match")
            continue
        key = book.dedup_key(pb.template_context(detection, playbook=book.name))
        flags = " (dry run)" if book.spec.dry_run else ""
        print(f"\n+ {book.name}{flags}: matches; dedup key {key!r}, cooldown {book.cooldown:g} s, "
              f"at most {book.spec.limits.max_runs} runs per {book.limit_window:g} s")
        context = pb.template_context(detection, {"id": "(test)", "key": key, "playbook": book.name,
                                                  "detections": 1}, book.name)
        for step in book.steps:
            kind = ("destructive" if type(step.action).destructive else
                    "notification" if type(step.action).notifies else "action")
            if not step.applies(detection):
                print(f"  {step.index + 1}. {step.id} ({step.spec.action}): skipped, its when does not hold")
                continue
            verb = "awaits approval, then runs" if step.spec.approval == "required" else "would run"
            print(f"  {step.index + 1}. {step.id} ({step.spec.action}, {kind}): {verb}; "
                  f"on failure: {step.spec.on_failure}")
            try:
                shown = step.shown(context)
            except Exception as exc:  # noqa: BLE001 - a template that fails on this detection
                print(f"     parameters fail to render: {exc}")
                continue
            for name, value in shown.items():
                if value is not None:
                    print(f"     {name}: {json.dumps(value, default=str)}")
    return 0


def cmd_admin(args: Any) -> int:
    token = os.environ.get(args.token_env, "")
    if not token:
        raise InferWatchError(f"{args.token_env} is not set: the admin token of the daemon is needed")
    base = args.url.rstrip("/")
    if args.command == "pending":
        request = urllib.request.Request(f"{base}/admin/pending", method="GET")
    else:
        body = {"incident": args.incident, "step": args.step,
                "by": args.by or os.environ.get("USER") or "inferwatch-cli"}
        request = urllib.request.Request(f"{base}/admin/{args.command}", data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
    request.add_header("Authorization", f"Bearer {token}")
    # Redirects are refused: urllib would carry the admin token to wherever the Location points.
    opener = urllib.request.build_opener(RefuseRedirects)
    try:
        with opener.open(request, timeout=10) as answer:
            status, payload = answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        status = exc.code
        if 300 <= status < 400:
            exc.close()
            raise InferWatchError(f"the daemon at {base} answered {status} redirect to another location; "
                                  "not followed (the admin token is sent to the daemon only)") from None
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {}
    except (urllib.error.URLError, OSError) as exc:
        raise InferWatchError(f"cannot reach the daemon at {base}: {getattr(exc, 'reason', exc)}") from None
    if args.command == "pending" and status == 200:
        rows = payload.get("pending", [])
        if not rows:
            print("no step awaits approval")
        for row in rows:
            print(f"{row['incident']} {row['step']} ({row['action']}, playbook {row['playbook']}, key {row['key']})")
        return 0
    message = payload.get("message") or payload.get("error") or f"HTTP {status}"
    print(message, file=sys.stdout if status == 200 else sys.stderr)
    return 0 if status == 200 else 1
