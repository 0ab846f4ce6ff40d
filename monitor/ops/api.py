"""The operator surface of a running daemon: it keeps the model inventory (``inventory``) and the risk
register (``register``), persists both in the state directory beside the detectors' checkpoint, and
answers the read-only API, every path behind the admin bearer token (``monitor.ops.auth``):

- ``GET /api/models``: every model with its versions, counts, detectors' phases, last detection and
  open incidents;
- ``GET /api/models/{name}``: one model, with its risk register (detections per ATLAS technique and OWASP
  entry per day) and its incidents;
- ``GET /api/incidents``: incidents, newest first, with the steps they ran;
- ``GET /api/register``: the whole register, as ``inferwatch register export`` writes it.

The views are plain functions of an inventory, a register and a journal path, so ``inferwatch status``
and ``register export`` give the same answers offline from a state directory.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from pathlib import Path
from typing import Any

from monitor.config import Config
from monitor.detections import Detection
from monitor.ops.auth import bearer_guard, only
from monitor.ops.http import Response, json_response
from monitor.ops.inventory import Inventory
from monitor.ops.metrics import Metrics
from monitor.ops.register import JOURNAL, RiskRegister, export, read_incidents

log = logging.getLogger("inferwatch.operator")


class OperatorSurface:
    """The inventory and register of one daemon. ``persist``: kept in ``state.dir`` (restored now,
    saved by ``save``); without it they live as long as the process."""

    def __init__(self, config: Config, metrics: Metrics, persist: bool = True):
        self.config = config
        self.metrics = metrics
        self.dir = Path(config.state.dir)
        self.journal = self.dir / JOURNAL
        self.persist = persist
        if persist:
            self.inventory = Inventory.load(self.dir, on_version=self._version_metric)
            self.register = RiskRegister.load(self.dir)
        else:
            self.inventory = Inventory(on_version=self._version_metric)
            self.register = RiskRegister()
        for model, entry in self.inventory.models.items():
            for version in entry.versions:
                self._version_metric(model, version, sorted(entry.detectors))
        if self.inventory.models:
            log.info("inventory of %d models restored from %s", len(self.inventory.models), self.dir)

    # -- hooks of the detect stage -----------------------------------------------------------------

    def after_batch(self, route: Any, batch: Any) -> None:
        """``Pipeline.after_batch``: a batch a model's detectors have read."""
        self.inventory.observe(route.model, batch, route.detectors)

    def on_detection(self, detection: Detection) -> None:
        """A listener of the published detections."""
        self.inventory.detected(detection)
        self.register.record(detection)

    def _version_metric(self, model: str, version: str, detectors: list[str] | None) -> None:
        labels = (model, version or "none")
        if detectors is None:
            try:
                self.metrics.model_info.remove(*labels)
            except KeyError:
                pass
            return
        self.metrics.model_info.labels(*labels).info({"detectors": ",".join(detectors)})

    def save(self) -> None:
        """Persist the inventory and the register (copying the journal's incidents into it); on the
        checkpoint job and at stop. A failure is logged: the next save tries again."""
        for model, clients in self.inventory.clients_estimates().items():
            self.metrics.model_clients.labels(model).set(round(clients))
        if not self.persist:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.register.archive(read_incidents(self.journal))
            self.inventory.save(self.dir)
            self.register.save(self.dir)
        except Exception:
            log.exception("saving the inventory and risk register in %s failed; retried at the next checkpoint",
                          self.dir)

    # -- HTTP --------------------------------------------------------------------------------------

    def routes(self, http: Any) -> None:
        authorized = bearer_guard(self.config.respond.admin_token_env)

        def guarded(view: Any) -> Any:
            def handler(method: str, headers: Any, read_body: Any, *rest: str) -> Response:
                denied = only("GET", method) or authorized(headers)
                if denied:
                    return denied
                return view(*rest)
            return handler

        journal = self.journal

        def models() -> Response:
            return json_response(200, models_view(self.inventory, self.register, journal))

        def one_model(name: str) -> Response:
            name = urllib.parse.unquote(name)
            view = model_view(self.inventory, self.register, journal, name)
            if view is None:
                return json_response(404, {"error": f"no model {name!r} in the inventory"})
            return json_response(200, view)

        def incidents() -> Response:
            return json_response(200, {"incidents": self.register.all_incidents(journal)})

        def register() -> Response:
            return json_response(200, export(self.register, journal))

        http.route_any("/api/models", guarded(models))
        http.route_prefix("/api/models/", guarded(one_model))
        http.route_any("/api/incidents", guarded(incidents))
        http.route_any("/api/register", guarded(register))


def models_view(inventory: Inventory, register: RiskRegister, journal: Path | None) -> dict[str, Any]:
    """Every model of the inventory with its open and total incidents, and the open incidents."""
    incidents = register.all_incidents(journal)
    rows = inventory.summaries()
    for row in rows:
        mine = [i for i in incidents if i["model"] == row["model"]]
        row["open_incidents"] = sum(1 for i in mine if i["state"] == "open")
        row["incidents_total"] = len(mine)
    open_ones = [i for i in incidents if i["state"] == "open"]
    return {"generated_at": time.time(), "saved_at": inventory.saved_at, "models": rows,
            "open_incidents": len(open_ones), "incidents_open": open_ones}


def model_view(inventory: Inventory, register: RiskRegister, journal: Path | None, name: str) -> dict[str, Any] | None:
    """One model: its inventory entry, its risk register and its incidents; None when it is unknown."""
    row = next((m for m in models_view(inventory, register, journal)["models"] if m["model"] == name), None)
    if row is None:
        return None
    document = export(register, journal, model=name)
    row["register"] = document["models"].get(name, {"rows": [], "detections": 0, "atlas": {}, "owasp": {},
                                                     "incidents": {"open": 0, "closed": 0}})
    row["incidents"] = document["incidents"]
    return row
