"""``inferwatch status`` and ``inferwatch register export``: the operator surface on the command line.

Both read a running daemon's API (``--url``, the admin token from the environment) or, offline, the
state directory a daemon keeps (``-c CONFIG`` or ``--state-dir DIR``): the same views either way
(``monitor.ops.api``). Given both, the daemon is asked first and the state directory read when it
cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# numpy and the rest load when a command runs: ``inferwatch --help`` parses with add_source_arguments.
from monitor.errors import InferWatchError

DEFAULT_URL = "http://127.0.0.1:9108"
DEFAULT_TOKEN_ENV = "INFERWATCH_ADMIN_TOKEN"


class Unreachable(Exception):
    """The daemon did not answer at all (nothing listens, a timeout): the state directory may."""


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", metavar="URL",
                   help=f"a running daemon's HTTP address (default {DEFAULT_URL} when no -c/--state-dir is given)")
    p.add_argument("--token-env", metavar="VAR",
                   help="environment variable holding the admin token (default: respond.admin_token_env of -c, "
                        f"else {DEFAULT_TOKEN_ENV})")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="read offline from the state directory (state.dir) of this config")
    p.add_argument("--state-dir", metavar="DIR", help="read offline from this state directory")


def cmd_status(args: argparse.Namespace) -> int:
    from monitor.ops.api import models_view
    from monitor.ops.inventory import Inventory
    from monitor.ops.register import JOURNAL, RiskRegister

    view, where = _read(args, "/api/models", lambda d: models_view(Inventory.load(d), RiskRegister.load(d), d / JOURNAL))
    if args.json:
        json.dump({**view, "source": where}, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    print(render_status(view, where))
    return 0


def cmd_register_export(args: argparse.Namespace) -> int:
    from monitor.ops.register import JOURNAL, RiskRegister, csv_text, export

    document, where = _read(args, "/api/register", lambda d: export(RiskRegister.load(d), d / JOURNAL))
    document["source"] = where
    text = csv_text(document) if args.format == "csv" else json.dumps(document, indent=2, sort_keys=True) + "\n"
    if args.output and args.output != "-":
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise InferWatchError(f"--output {args.output}: cannot write there ({exc.strerror})") from None
        rows = sum(len(m["rows"]) for m in document["models"].values())
        print(f"{args.output}: {rows} detection rows and {len(document['incidents'])} incidents ({where})",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# -- where the data comes from -----------------------------------------------------------------------


def _read(args: argparse.Namespace, path: str, offline: Any) -> tuple[dict[str, Any], str]:
    """(document, where it came from): the daemon's ``path``, or ``offline(state_dir)``."""
    state_dir = _state_dir(args)
    if args.url or state_dir is None:
        url = (args.url or DEFAULT_URL).rstrip("/")
        try:
            return _get(url, path, _token(args)), f"daemon at {url}"
        except Unreachable as exc:
            if state_dir is None:
                raise InferWatchError(f"cannot reach the daemon at {url} ({exc}); give --url of a running "
                                      "daemon, or -c CONFIG / --state-dir DIR to read its state directory "
                                      "offline") from None
            print(f"inferwatch: the daemon at {url} cannot be reached ({exc}); reading {state_dir} instead",
                  file=sys.stderr)
    if not state_dir.is_dir():
        raise InferWatchError(f"state directory {state_dir}: not found (expected the state.dir of a daemon that "
                              "has run)")
    from monitor.ops import inventory, register

    if not any((state_dir / name).exists() for name in (inventory.FILE, register.FILE, register.JOURNAL)):
        raise InferWatchError(f"state directory {state_dir}: no {inventory.FILE}, {register.FILE} or {register.JOURNAL} "
                              "yet (a daemon writes them at its checkpoints)")
    return offline(state_dir), f"state directory {state_dir}"


def _state_dir(args: argparse.Namespace) -> Path | None:
    if args.state_dir:
        return Path(args.state_dir)
    if args.config:
        return Path(_config(args).state.dir)
    return None


def _config(args: argparse.Namespace) -> Any:
    from monitor.config import load_config

    return load_config(args.config)


def _token(args: argparse.Namespace) -> str:
    name = args.token_env or (_config(args).respond.admin_token_env if args.config else DEFAULT_TOKEN_ENV)
    token = os.environ.get(name, "")
    if not token:
        raise InferWatchError(f"{name} is not set: the daemon's API needs its admin token (or read the state "
                              "directory offline with -c CONFIG / --state-dir DIR)")
    return token


def _get(base: str, path: str, token: str) -> dict[str, Any]:
    from monitor.respond.delivery import RefuseRedirects

    request = urllib.request.Request(f"{base}{path}", method="GET", headers={"Authorization": f"Bearer {token}"})
    # Redirects are refused: urllib would carry the admin token to wherever the Location points.
    opener = urllib.request.build_opener(RefuseRedirects)
    try:
        with opener.open(request, timeout=10) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        with exc:
            try:
                message = json.loads(exc.read() or b"{}").get("error", "")
            except ValueError:
                message = ""
        if 300 <= exc.code < 400:
            raise InferWatchError(f"the daemon at {base} answered {exc.code} redirect; not followed (the admin "
                                  "token is sent to the daemon only)") from None
        raise InferWatchError(f"the daemon at {base} answered {exc.code} to {path}: {message or exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(str(getattr(exc, "reason", exc))) from None
    except ValueError:
        raise InferWatchError(f"{base}{path} did not answer JSON: is this an inferwatch daemon?") from None


# -- the table ---------------------------------------------------------------------------------------


def render_status(view: dict[str, Any], where: str) -> str:
    models = view["models"]
    lines = [f"{len(models)} model{'s' if len(models) != 1 else ''} watched, {view['open_incidents']} open "
             f"incident{'s' if view['open_incidents'] != 1 else ''} ({where}; times UTC: seen and detected in event "
             "time, incidents on the daemon's clock)", ""]
    header = ["MODEL / VERSION", "EVENTS", "CLIENTS~", "FIRST SEEN", "LAST SEEN", "DETECTORS", "DETECTIONS",
              "INCIDENTS OPEN/ALL"]
    rows = []
    for m in models:
        detectors = " ".join(f"{d['detector']}={d['phase']}" for d in m["detectors"]) or "-"
        rows.append([m["model"], f"{m['events']:,}", f"{m['clients_estimate']:,}", _when(m["first_seen"]),
                     _when(m["last_seen"]), detectors, str(m["detections"]),
                     f"{m['open_incidents']}/{m['incidents_total']}"])
        for v in m["versions"]:
            rows.append([f"  {v['version'] or '(no version)'}", f"{v['events']:,}", f"{v['clients_estimate']:,}",
                         _when(v["first_seen"]), _when(v["last_seen"]), "", "", ""])
    lines += _table(header, rows, right={1, 2, 6, 7})
    fired = [m for m in models if m["last_detection"]]
    if fired:
        lines += ["", "last detection per model:"]
        for m in fired:
            d = m["last_detection"]
            lines.append(f"  {m['model']}  {_when(d['ts'])}  {d['detector']}/{d['kind']} ({d['severity']})"
                         + (f" client {d['client_id']}" if d.get("client_id") else "") + f": {d['summary']}")
    open_ones = view["incidents_open"]
    if open_ones:
        lines += ["", "open incidents:"]
        for i in open_ones:
            steps = ", ".join(f"{s['step']} {s['state']}" for s in i["steps"]) or "no steps"
            lines.append(f"  {i['model']}  {i['id']}  {i['playbook']}{' (dry run)' if i['dry_run'] else ''}  "
                         f"opened {_when(i['opened_at'])}, {i['detections']} detection{'s' if i['detections'] != 1 else ''}; "
                         f"steps: {steps}")
    if not models:
        lines.append("(no model seen yet)")
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))
