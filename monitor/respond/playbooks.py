"""The playbook language (DESIGN §5): the YAML schema, loading with full validation, matching a
detection, and rendering a step's parameters in Jinja2's sandbox.

A playbook set is loaded whole or not at all: every file of the directory is parsed, every field
checked (unknown keys, unknown actions, each action's parameter schema, durations, templates that
do not compile, ``${VAR}`` that the environment lacks), and any error names the file, the playbook
and the field. A reload that fails keeps the previous set.

Templates see the detection's fields (``model``, ``client_id``, ``kind``, ``severity``,
``summary``, ``score``, ``evidence``...), ``incident`` (``id``, ``key``, ``playbook``,
``detections``) and ``playbook``. They render in an immutable sandbox: no attribute access to
Python internals, no code; a detection field holding ``{{ 7*7 }}`` is inserted as that text, never
evaluated, because only the playbook's own text is a template.

``${VAR}`` reads the environment (a Kubernetes Secret). It is compiled to a call of a function the
sandbox provides, so a secret appears only where the playbook's author wrote it, never because a
detection field (which an attacker may choose, e.g. a client id) spelled ``${VAR}``. Secret values
are registered with the log redaction and are never stored in the journal: a step's parameters are
rendered again from the playbook when the step runs or is retried.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import msgspec
import yaml
from jinja2 import StrictUndefined, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from monitor.config import parse_duration
from monitor.detections import SEVERITIES
from monitor.errors import InferWatchError
from monitor.ops import logs
from monitor.respond import actions

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SEVERITY_TEST = re.compile(r"^\s*(>=|<=|==|!=|>|<)?\s*([a-z]+)\s*$")
_STEP_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class PlaybookError(InferWatchError):
    """A playbook file is invalid; the message names the file, the playbook and the field."""


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


Strings = str | list[str]


class Match(_Base, kw_only=True):
    """Conditions on a detection; every key given must hold. Lists mean any of; model, client_id and
    label values are globs; severity is a level with an optional comparison (">=warning")."""

    detector: Strings | None = None
    kind: Strings | None = None
    severity: str | None = None
    model: Strings | None = None
    client_id: Strings | None = None  # globs; "*" asks for a detection that names a client
    has_client: bool | None = None  # true: the detection names a client; false: it is about the model
    labels: dict[str, str] | None = None


class Dedup(_Base, kw_only=True):
    key: str = "{{ model }}/{{ kind }}/{{ client_id }}"
    cooldown: str | float = "30m"


class Limits(_Base, kw_only=True):
    max_runs: int = 10
    per: str | float = "1h"


class Resolve(_Base, kw_only=True):
    # The incident closes when no detection has joined it for this long; its notifications then
    # send their all-clear (PagerDuty resolve, Alertmanager endsAt, a Slack message).
    after: str | float = "30m"
    notify: bool = True


class Step(_Base, kw_only=True):
    id: str
    action: str
    with_: dict[str, Any] = msgspec.field(name="with", default_factory=dict)
    when: Match | None = None
    approval: Literal["required", "none"] = "none"
    on_failure: Literal["abort", "continue"] = "abort"


class Spec(_Base, kw_only=True):
    name: str
    description: str = ""
    match: Match
    dedup: Dedup = msgspec.field(default_factory=Dedup)
    limits: Limits = msgspec.field(default_factory=Limits)
    resolve: Resolve = msgspec.field(default_factory=Resolve)
    dry_run: bool = False
    steps: list[Step]


@dataclass
class Playbook:
    """A validated playbook, its templates compiled and its durations in seconds."""

    spec: Spec
    file: str
    cooldown: float
    limit_window: float
    resolve_after: float
    key_template: Any
    steps: list["CompiledStep"]

    @property
    def name(self) -> str:
        return self.spec.name

    def matches(self, detection: dict[str, Any]) -> bool:
        return conditions_hold(self.spec.match, detection)

    def dedup_key(self, detection: dict[str, Any]) -> str:
        return f"{self.name}:{self.key_template.render(template_context(detection))}"


@dataclass
class CompiledStep:
    spec: Step
    action: actions.Action
    index: int
    templates: Any  # the ``with`` structure, strings compiled per the action's escaping

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def digest(self) -> str:
        """The step's definition as written (action, with, when, approval, on_failure): an incident
        pins it, so a reload cannot change what an approval was given for."""
        return hashlib.sha256(msgspec.json.encode(self.spec)).hexdigest()[:16]

    def applies(self, detection: dict[str, Any]) -> bool:
        return self.spec.when is None or conditions_hold(self.spec.when, detection)

    def render(self, context: dict[str, Any], *, secrets: bool = True) -> Any:
        """The step's parameters for this incident, as the action's Params. ``secrets=False``
        shows ``${VAR}`` as ``***`` (for dry runs, reports and the journal)."""
        env_value: Callable[[str], str] = _env_value if secrets else (lambda name: "***")
        rendered = _render_tree(self.templates, {**context, "__env": env_value})
        return msgspec.convert(rendered, type(self.action).Params, strict=False)

    def shown(self, context: dict[str, Any]) -> dict[str, Any]:
        """The rendered parameters without secrets, JSON-able."""
        return msgspec.to_builtins(self.render(context, secrets=False))


@dataclass
class PlaybookSet:
    playbooks: list[Playbook] = field(default_factory=list)
    files: dict[str, float] = field(default_factory=dict)  # path -> mtime, for reload on change

    def matching(self, detection: dict[str, Any]) -> list[Playbook]:
        return [book for book in self.playbooks if book.matches(detection)]

    def get(self, name: str) -> Playbook | None:
        return next((book for book in self.playbooks if book.name == name), None)


# ---------------------------------------------------------------- matching


def _severity_holds(test: str, severity: str) -> bool:
    op, level = _SEVERITY_TEST.match(test).groups()  # checked at load
    have, want = SEVERITIES.index(severity) if severity in SEVERITIES else -1, SEVERITIES.index(level)
    return {None: have == want, "==": have == want, "!=": have != want, ">=": have >= want,
            "<=": have <= want, ">": have > want, "<": have < want}[op]


def _any_glob(patterns: Strings, value: Any) -> bool:
    if value is None:
        return False
    patterns = [patterns] if isinstance(patterns, str) else patterns
    return any(fnmatch.fnmatchcase(str(value), p) for p in patterns)


def _any_of(wanted: Strings, value: Any) -> bool:
    return value in ([wanted] if isinstance(wanted, str) else wanted)


def conditions_hold(match: Match, detection: dict[str, Any]) -> bool:
    if match.detector is not None and not _any_of(match.detector, detection.get("detector")):
        return False
    if match.kind is not None and not _any_of(match.kind, detection.get("kind")):
        return False
    if match.severity is not None and not _severity_holds(match.severity, detection.get("severity", "")):
        return False
    if match.model is not None and not _any_glob(match.model, detection.get("model")):
        return False
    if match.client_id is not None and not _any_glob(match.client_id, detection.get("client_id")):
        return False
    if match.has_client is not None and bool(detection.get("client_id")) != match.has_client:
        return False
    if match.labels:
        have = detection.get("labels") or {}
        if not all(_any_glob(glob, have.get(key)) for key, glob in match.labels.items()):
            return False
    return True


# ---------------------------------------------------------------- templates


def _make_environment(escape: Callable[[str], str] | None) -> ImmutableSandboxedEnvironment:
    def finalize(value: Any) -> Any:
        if value is None:
            return ""
        if escape is None or isinstance(value, _SecretText):
            return value
        return escape(str(value))

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, finalize=finalize, autoescape=False)
    env.filters["safe_secret"] = _SecretText
    return env


_ENVIRONMENTS: dict[Any, ImmutableSandboxedEnvironment] = {}


def _environment(escape: Callable[[str], str] | None) -> ImmutableSandboxedEnvironment:
    if escape not in _ENVIRONMENTS:
        _ENVIRONMENTS[escape] = _make_environment(escape)
    return _ENVIRONMENTS[escape]


def _env_value(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise InferWatchError(f"environment variable {name} is not set")
    return value


def _compile_string(text: str, escape: Callable[[str], str] | None) -> Any:
    # ${VAR} becomes a call to the sandbox's __env: the value enters only where the author wrote it.
    # Literal "{{" inside a ${...} cannot happen: the name pattern has no braces.
    source = _ENV_REF.sub(lambda m: "{{ __env(%r) | safe_secret }}" % m.group(1), text)
    if "{{" not in source and "{%" not in source:
        return text
    return _environment(escape).from_string(source)


class _SecretText(str):
    """Where ``${VAR}`` was: the author's value, inserted as is, never escaped."""


def _compile_tree(value: Any, escape: Callable[[str], str] | None) -> Any:
    if isinstance(value, str):
        return _compile_string(value, escape)
    if isinstance(value, dict):
        return {k: _compile_tree(v, escape) for k, v in value.items()}
    if isinstance(value, list):
        return [_compile_tree(v, escape) for v in value]
    return value


def _render_tree(value: Any, context: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _render_tree(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [_render_tree(v, context) for v in value]
    if hasattr(value, "render"):
        return value.render(context)
    return value


def template_context(detection: dict[str, Any], incident: dict[str, Any] | None = None,
                     playbook: str = "") -> dict[str, Any]:
    """What templates see: the detection's fields at the top, the incident and the playbook's name."""
    context = {name: detection.get(name) for name in (
        "detection_id", "ts", "detector", "kind", "model", "model_version", "client_id", "severity",
        "score", "threshold", "summary", "evidence", "atlas", "owasp", "labels", "source")}
    context["detection"] = dict(detection)
    context["incident"] = incident or {}
    context["playbook"] = playbook
    return context


# ---------------------------------------------------------------- loading


def _where(file: str, book: str | None, path: str) -> str:
    name = f" playbook {book!r}" if book else ""
    return f"{file}:{name} {path}".rstrip() if path else f"{file}:{name}"


def _duration(value: str | float, where: str) -> float:
    try:
        seconds = parse_duration(value)
    except (ValueError, TypeError) as exc:
        raise PlaybookError(f"{where}: {exc}") from None
    if seconds < 0:
        raise PlaybookError(f"{where}: a duration cannot be negative")
    return seconds


def _check_match(match: Match, where: str) -> None:
    for name in ("detector", "kind", "model", "client_id"):
        if getattr(match, name) == []:
            raise PlaybookError(f"{where}.{name}: an empty list matches nothing; leave the key out to match any")
    if match.severity is not None:
        parsed = _SEVERITY_TEST.match(match.severity)
        if not parsed or parsed.group(2) not in SEVERITIES:
            raise PlaybookError(f"{where}.severity: expected a level ({', '.join(SEVERITIES)}) with an optional "
                                f"comparison (>=, <=, >, <, ==, !=), got {match.severity!r}")


def _missing_env(value: Any) -> list[str]:
    if isinstance(value, str):
        return [name for name in _ENV_REF.findall(value) if name not in os.environ]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _missing_env(v)]
    if isinstance(value, list):
        return [n for v in value for n in _missing_env(v)]
    return []


def _register_secrets(value: Any) -> None:
    if isinstance(value, str):
        for name in _ENV_REF.findall(value):
            if os.environ.get(name):
                logs.redact(os.environ[name])
    elif isinstance(value, dict):
        for v in value.values():
            _register_secrets(v)
    elif isinstance(value, list):
        for v in value:
            _register_secrets(v)


def _compile_step(step: Step, index: int, where: str, require_env: bool) -> CompiledStep:
    if not _STEP_ID.match(step.id):
        raise PlaybookError(f"{where}.id: expected letters, digits, '_', '.', '-' (at most 64), got {step.id!r}")
    try:
        action = actions.get(step.action)
    except KeyError:
        raise PlaybookError(f"{where}.action: unknown action {step.action!r}; "
                            f"expected one of {', '.join(actions.NAMES)}") from None
    if step.when is not None:
        _check_match(step.when, f"{where}.when")
    missing = _missing_env(step.with_)
    if missing and require_env:
        raise PlaybookError(f"{where}.with: environment variable {missing[0]} is not set")
    _register_secrets(step.with_)
    escape = getattr(action, "escape", None)
    try:
        # Only the fields a receiver interprets (Slack's text and blocks) escape what templates insert.
        templates = {key: _compile_tree(value, escape if key in action.escaped_fields else None)
                     for key, value in step.with_.items()}
    except TemplateSyntaxError as exc:
        raise PlaybookError(f"{where}.with: template error: {exc.message} (line {exc.lineno})") from None
    compiled = CompiledStep(spec=step, action=action, index=index, templates=templates)
    # Check the parameters' types with every template rendered on a sample detection: a template
    # can only stand where a string is expected, or where its output converts (strict=False).
    sample = template_context(_SAMPLE_DETECTION, {"id": "sample", "key": "sample", "playbook": "", "detections": 1,
                                                  "opened_at": 0.0})
    try:
        # With the secrets when the environment has them, so checks see real URLs; else shown as ***.
        params = compiled.render(sample, secrets=not missing)
    except msgspec.ValidationError as exc:
        raise PlaybookError(f"{where}.with: {_describe(exc, type(action).Params)}") from None
    except Exception as exc:  # noqa: BLE001 - a template that fails on a sample detection
        raise PlaybookError(f"{where}.with: template fails on a sample detection: {exc}") from None
    try:
        action.check(params)
    except ValueError as exc:
        raise PlaybookError(f"{where}.with: {exc}") from None
    return compiled


_SAMPLE_DETECTION = {
    "detection_id": "0" * 32, "ts": 0.0, "detector": "probing", "kind": "model_extraction",
    "model": "model", "model_version": "v1", "client_id": "client", "severity": "warning", "score": 1.0,
    "threshold": 1.0, "summary": "sample", "evidence": {}, "atlas": [], "owasp": [], "labels": {},
    "source": None,
}


def _describe(exc: msgspec.ValidationError, root: type | None = None) -> str:
    """msgspec's message as "path: what", unknown keys with the keys allowed there."""
    text = str(exc)
    match = re.search(r" - at `\$(.*)`$", text)
    path = match.group(1).lstrip(".") if match else ""
    problem = text[:match.start()] if match else text
    unknown = re.match(r"Object contains unknown field `(.*)`", problem)
    if unknown and root is not None:
        struct = _struct_in(_type_at(root, path))
        if struct is not None:
            allowed = ", ".join(f.encode_name for f in msgspec.structs.fields(struct))
            problem = f"unknown key {unknown.group(1)!r}; expected one of {allowed}"
    if problem.startswith("Invalid enum value") and root is not None:
        import typing

        choices = [a for a in typing.get_args(_type_at(root, path)) if isinstance(a, str)]
        if choices:
            problem = f"{problem}; expected one of {', '.join(choices)}"
    return f"{path}: {problem}" if path else problem


def _type_at(root: type, path: str) -> Any:
    """The schema's type at ``path`` ("steps[0].when"); None when the path leaves the schema."""
    current: Any = root
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        current = _struct_in(current, list_item=part.startswith("["))
        if current is None:
            return None
        if not part.startswith("["):
            field = next((f for f in msgspec.structs.fields(current) if f.encode_name == part), None)
            if field is None:
                return None
            current = field.type
    return current


def _struct_in(kind: Any, list_item: bool = False) -> Any:
    import typing

    if list_item:
        args = [a for a in typing.get_args(kind) if typing.get_origin(a) is list or a is list] or [kind]
        inner = typing.get_args(args[0])
        return _struct_in(inner[0]) if inner else None
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return kind
    for arg in typing.get_args(kind):
        found = _struct_in(arg)
        if found is not None:
            return found
    return None


def _compile(spec: Spec, file: str, require_env: bool) -> Playbook:
    where = _where(file, spec.name, "")
    if not _NAME.match(spec.name):
        raise PlaybookError(f"{file}: name: expected letters, digits, '_', '.', '-' (at most 100, a letter or digit "
                            f"first), got {spec.name!r}")
    _check_match(spec.match, f"{where} match")
    if not spec.steps:
        raise PlaybookError(f"{where} steps: at least one step is needed")
    seen: set[str] = set()
    steps = []
    for index, step in enumerate(spec.steps):
        if step.id in seen:
            raise PlaybookError(f"{where} steps[{index}].id: {step.id!r} is used twice")
        seen.add(step.id)
        steps.append(_compile_step(step, index, f"{where} steps[{index}]", require_env))
    if spec.limits.max_runs < 1:
        raise PlaybookError(f"{where} limits.max_runs: must be at least 1")
    try:
        key = _environment(None).from_string(spec.dedup.key)
        key.render(template_context(_SAMPLE_DETECTION))
    except TemplateSyntaxError as exc:
        raise PlaybookError(f"{where} dedup.key: template error: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001
        raise PlaybookError(f"{where} dedup.key: template fails on a sample detection: {exc}") from None
    if _ENV_REF.search(spec.dedup.key):
        raise PlaybookError(f"{where} dedup.key: ${{VAR}} is not allowed in a key (keys are stored and shown)")
    book = Playbook(
        spec=spec, file=file, key_template=key, steps=steps,
        cooldown=_duration(spec.dedup.cooldown, f"{where} dedup.cooldown"),
        limit_window=_duration(spec.limits.per, f"{where} limits.per"),
        resolve_after=_duration(spec.resolve.after, f"{where} resolve.after"),
    )
    for field_name, seconds in (("limits.per", book.limit_window), ("resolve.after", book.resolve_after)):
        if seconds < 1:
            raise PlaybookError(f"{where} {field_name}: expected at least 1s")
    return book


def _files(directory: Path) -> list[Path]:
    if directory.is_file():
        return [directory]
    if not directory.is_dir():
        raise PlaybookError(f"{directory}: no such playbook directory")
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last one
    silently: ``approval: required`` then ``approval: none`` would drop an approval gate)."""


def _no_duplicate_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def load_file(path: Path, require_env: bool = True, dry_run: bool = False) -> list[Playbook]:
    """The playbooks of one YAML file: one playbook, a list of them, or several YAML documents."""
    try:
        documents = [d for d in yaml.load_all(path.read_text(encoding="utf-8"), Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as exc:
        raise PlaybookError(f"{path}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlaybookError(f"{path}: cannot read: {exc}") from None
    raw = [item for d in documents for item in (d if isinstance(d, list) else [d])]
    books = []
    for position, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        try:
            spec = msgspec.convert(item, Spec)
        except msgspec.ValidationError as exc:
            label = repr(name) if name else f"#{position + 1}"
            raise PlaybookError(f"{path}: playbook {label}: {_describe(exc, Spec)}") from None
        # A playbook in a dry run shows secrets as *** and never sends: it does not need them.
        books.append(_compile(spec, str(path), require_env and not (dry_run or spec.dry_run)))
    return books


def load(directory: str | Path, require_env: bool = True, dry_run: bool = False) -> PlaybookSet:
    """Every playbook of ``directory`` (or of one file), validated; PlaybookError on the first fault.

    ``require_env=False`` accepts ``${VAR}`` that the environment lacks (``inferwatch check`` on a
    laptop without the production secrets); the daemon requires them, except for playbooks in a dry
    run (``dry_run``: the global one).
    """
    directory = Path(directory)
    books: list[Playbook] = []
    files: dict[str, float] = {}
    for path in _files(directory):
        files[str(path)] = path.stat().st_mtime
        books.extend(load_file(path, require_env, dry_run))
    names: dict[str, str] = {}
    for book in books:
        if book.name in names:
            raise PlaybookError(f"{book.file}: playbook {book.name!r}: name already used in {names[book.name]}")
        names[book.name] = book.file
    return PlaybookSet(books, files)


def file_times(directory: str | Path) -> dict[str, float]:
    """The playbook files of ``directory`` and their modification times ({} when unreadable)."""
    try:
        return {str(p): p.stat().st_mtime for p in _files(Path(directory))}
    except (PlaybookError, OSError):
        return {}


def changed(directory: str | Path, current: PlaybookSet) -> bool:
    """Whether the directory's files differ (added, removed, modified) from those ``current`` came from."""
    return file_times(directory) != current.files
