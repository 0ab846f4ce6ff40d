"""The one interface every playbook action implements, and the outcomes it reports.

An action is a small class: its ``name`` (the ``action:`` of a step), its ``Params`` (a msgspec
Struct checked when playbooks load, so a typo fails at start and not at 3 a.m.) and ``run``. The
engine never knows which action it talks to; it renders the step's ``with:`` templates, converts
them to ``Params`` and calls ``run`` with the incident and the services actions may use.

``run`` returns a JSON-able detail for the journal (never a secret) or raises:

- ``Transient``: worth trying again (a 5xx, a timeout, a 429 with its ``Retry-After``);
- ``Final``: trying again cannot help (a 4xx, a paused deployment, a missing history).

A ``destructive`` action changes the world (isolates, rolls back, blocks): it counts against the
global budget of destructive actions, runs at most once per incident, and after a crash in the middle
of it ``reconcile`` reads the current state before anything runs again. A ``notifies`` action
is a message: it goes through the journal's outbox and is retried until delivered, across restarts,
and ``resolve`` sends its all-clear when the incident closes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import msgspec


SECRET_SHOWN = "***"  # what a ${VAR} renders as where secrets are not shown (dry runs, checks without them)


def is_url(value: str) -> bool:
    """An http(s) URL, or a secret not shown (``inferwatch check`` without the production secrets)."""
    return value.startswith(("https://", "http://")) or SECRET_SHOWN in value


class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every action's parameters: unknown keys are errors."""


class Transient(Exception):
    """The step may succeed if tried again; ``retry_after`` (seconds) when the other side said when."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Final(Exception):
    """The step failed and trying again cannot help."""


@dataclass(frozen=True)
class Incident:
    """What an action knows of the incident it serves."""

    id: str  # stable for the incident's life: PagerDuty's dedup_key, Alertmanager's fingerprint label
    playbook: str
    key: str  # the rendered dedup key
    opened_at: float
    detection: dict[str, Any]  # the detection that opened it (DESIGN §3)
    detections: int = 1  # how many detections it has gathered


@dataclass
class Services:
    """What actions may use; each is built on first use so a playbook set without Kubernetes steps
    never imports the Kubernetes client."""

    state_dir: Path
    http_timeout: float = 10.0
    now: Callable[[], float] = field(default=None)  # type: ignore[assignment]
    kubernetes: Callable[[], Any] | None = None  # returns a kubernetes.client.ApiClient
    producer: Callable[[], Any] | None = None  # returns a KafkaProducer
    events: Any = None  # monitor.respond.ring.EventRing: the last events per model and client
    extras: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.now is None:
            import time
            self.now = time.time


class Action:
    """Subclass, set the class attributes, implement ``run``; register the class in ``registry``."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]]
    destructive: ClassVar[bool] = False
    notifies: ClassVar[bool] = False
    # Fields whose template insertions pass through ``escape`` (receiver's markup made inert text).
    escaped_fields: ClassVar[frozenset[str]] = frozenset()
    escape: ClassVar[Any] = None

    def run(self, params: Any, incident: Incident, services: Services) -> dict[str, Any]:
        raise NotImplementedError

    def reconcile(self, params: Any, incident: Incident, services: Services,
                  attempt: dict[str, Any]) -> dict[str, Any] | None:
        """After a crash during ``run``: return the step's detail if its effect is already in place
        (then the step is done), or None to run it again. ``attempt`` is what the journal recorded
        before the crash (``{}`` when nothing). Destructive actions must implement this."""
        return None

    def resolve(self, params: Any, incident: Incident, services: Services) -> dict[str, Any] | None:
        """Send the all-clear for a notification sent by ``run``; None when the action has none."""
        return None

    def refresh(self, params: Any, incident: Incident, services: Services,
                detail: dict[str, Any]) -> dict[str, Any] | None:
        """Keep a delivered notification alive while its incident stays open (called every few
        seconds with what the last delivery reported); the new detail when it sent again, else None.
        Transient or Final when sending failed (tried again at the next call)."""
        return None

    def check(self, params: Any) -> None:
        """Checks beyond the types, at load time; raise ValueError with a message naming the field.
        Templated strings are not rendered yet: check only what cannot be a template."""
