"""The daemon's configuration: its schema, defaults, loading from YAML and command-line overrides.

Every key is typed with msgspec, so a wrong key or value is reported with the file, the YAML path
and what was expected (``configs/x.yaml: $.kafka.poll.max_records: Expected `int` >= 1``), and
``inferwatch check`` exits 2 on it. Detector parameters are checked by each detector's own schema
(see ``monitor.detectors``), also at load time.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import msgspec
import yaml

from monitor.errors import ConfigError

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
# "30s", "5m", "1h", "250ms", or a plain number of seconds
Duration = Union[str, float]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``90``, ``"90s"``, ``"5m"``, ``"1h"``, ``"250ms"``; raises ValueError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a duration cannot be negative, got {text}")
        return float(text)
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"expected a duration such as 30s, 5m or 1h, got {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Config sections reject unknown keys, so a typo is an error rather than a silent default."""


class Topics(Base):
    logs: str = "inference-logs"
    dead_letters: str = "inference-logs.dlq"
    detections: str = "detections"


class Poll(Base):
    # Large batches amortise the per-batch round trips (acknowledgement, commit): measured with
    # bench/throughput.py, 5000 -> 20000 took the detect stage from about 75k to 88k events/s.
    max_records: PositiveInt = 20000
    timeout_ms: PositiveInt = 500


class Kafka(Base):
    bootstrap_servers: list[str] = msgspec.field(default_factory=lambda: ["localhost:9092"])
    topics: Topics = msgspec.field(default_factory=Topics)
    group_id: str = "inferwatch-detect"
    client_id: str = "inferwatch"
    # Passed unchanged to kafka-python (security_protocol, sasl_mechanism, sasl_plain_username,
    # sasl_plain_password, ssl_cafile, ssl_certfile, ssl_keyfile, ...). Values of the form
    # ${VAR} are read from the environment so passwords can live in a Kubernetes Secret.
    security: dict[str, Any] = msgspec.field(default_factory=dict)
    poll: Poll = msgspec.field(default_factory=Poll)
    # Where a new consumer group starts: earliest replays what the topic retains, latest skips it.
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # Create missing topics at start (only where the broker allows it).
    create_topics: bool = False
    topic_partitions: PositiveInt = 6
    # How long to wait for the broker to acknowledge the batch's outputs before retrying.
    ack_timeout: Duration = "10s"
    session_timeout_ms: PositiveInt = 10000
    max_poll_interval_ms: PositiveInt = 300000
    # Run the consumer in a process of its own (kafka-python's record parsing then uses another core
    # than the detectors); false keeps everything in one process.
    consumer_process: bool = True


class ModelOverride(Base):
    model: str  # glob on the model name
    # detector name -> parameters replacing the defaults, or false to switch it off for these models
    detectors: dict[str, dict[str, Any] | bool] = msgspec.field(default_factory=dict)
    # carried by these models' detections (team, tier, ...); playbooks match on them (match.labels)
    labels: dict[str, str] = msgspec.field(default_factory=dict)


class Models(Base):
    watch: list[str] = msgspec.field(default_factory=lambda: ["*"])
    ignore: list[str] = msgspec.field(default_factory=list)
    overrides: list[ModelOverride] = msgspec.field(default_factory=list)


class Limits(Base):
    max_message_bytes: PositiveInt = 1_048_576
    max_features: PositiveInt = 4096
    # Models beyond this many are still counted, but not given detectors (bounded memory).
    max_models: PositiveInt = 1000
    max_string_chars: PositiveInt = 512


class Http(Base):
    host: str = "0.0.0.0"
    port: Port = 9108


class State(Base):
    dir: str = "./state"
    # Offsets are committed with each checkpoint (they point at it): a crash or a rebalance reads this
    # much of a partition again.
    checkpoint_interval: Duration = "30s"


class ScrapeTarget(Base):
    url: str  # a model server's Prometheus endpoint, http(s)://[user:password@]host:port/metrics; ${VAR} allowed
    model: str  # the model it serves: its figures go to that model's resource detector
    name: str | None = None  # for metrics and reports; default host:port of the url (never its credentials)
    cpu_seconds: str = "process_cpu_seconds_total"  # a counter of CPU seconds: charted as cores in use
    memory_bytes: str = "process_resident_memory_bytes"  # summed over its series, charted in MB
    gpu_utilization: str | None = "DCGM_FI_DEV_GPU_UTIL"  # percent, averaged over its series (NVIDIA DCGM)
    bearer_token: str | None = None  # sent as "Authorization: Bearer ..."; ${VAR} reads the environment

    def label(self) -> str:
        if self.name:
            return self.name
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


class Scrape(Base):
    every: Duration = "15s"
    timeout: Duration = "5s"
    targets: list[ScrapeTarget] = msgspec.field(default_factory=list)


class Jobs(Base):
    """Periodic work on APScheduler (the checkpoint's interval is ``state.checkpoint_interval``)."""

    evict_idle_clients: Duration | None = "5m"  # forget clients idle past their detector's client_idle
    reference_refresh: Duration | None = None  # e.g. 6h: resource baselines slide to recent events
    scrape: Scrape = msgspec.field(default_factory=Scrape)


class Logging(Base):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class RespondKubernetes(Base):
    # auto: the pod's service account when running in a cluster, else ~/.kube/config (or $KUBECONFIG)
    mode: Literal["auto", "in_cluster", "kubeconfig"] = "auto"
    kubeconfig: str | None = None
    context: str | None = None


class Respond(Base):
    """Stage 2 (DESIGN §5): playbooks run on detections."""

    # A directory of *.yaml (or one file), relative to the working directory; null: no respond stage.
    playbooks: str | None = None
    group_id: str = "inferwatch-respond"  # its own consumer group on the detections topic
    dry_run: bool = False  # every playbook shows its steps and runs none
    max_destructive_per_hour: PositiveInt = 10  # isolations, rollbacks, blocks: beyond it steps are refused
    http_timeout: Duration = "10s"
    outbox_max_age: Duration = "24h"  # a notification not delivered by then is given up (and logged)
    journal_retention: Duration = "30d"  # closed incidents older than this leave the journal
    workers: PositiveInt = 4
    # The admin endpoints (/admin/pending, /admin/approve, ...) need "Authorization: Bearer <token>"
    # with the token from this environment variable; without it they are off.
    admin_token_env: str = "INFERWATCH_ADMIN_TOKEN"
    kubernetes: RespondKubernetes = msgspec.field(default_factory=RespondKubernetes)
    denylist_topic: str = "inferwatch.denylist"  # compacted; block_client writes its entries here
    snapshot_events: PositiveInt = 1000  # events kept per model and per client for evidence snapshots


class EventTime(Base):
    """How a model's events are cut into the batches its detectors read (DESIGN §1, "Batches")."""
    # Detectors read each model's events one tick of event time at a time ("1s"), so the batches, and
    # so the detections, are the same whatever the polls were: live, after a restart, in a replay.
    # null: batches as polled (a little sooner, but detections then depend on poll sizes).
    tick: Duration | None = "1s"
    # A model's batch is its complete ticks up to this many events or this span of event time, so a
    # model of a few hundred events a second is not read in batches of a few hundred (each batch costs
    # the detectors ~10 ms whatever its size); the span bounds the wait of a quiet model.
    min_batch_events: PositiveInt = 5000
    max_batch_span: Duration = "10s"
    # The newest tick of a model waits for an event of a later tick; after this long without one
    # (wall-clock) it is read anyway.
    flush_after: Duration = "5s"


class Config(Base):
    kafka: Kafka = msgspec.field(default_factory=Kafka)
    models: Models = msgspec.field(default_factory=Models)
    # detector name -> its parameters; every detector listed here runs on every watched model
    detectors: dict[str, dict[str, Any]] = msgspec.field(
        default_factory=lambda: {"drift": {}}
    )
    limits: Limits = msgspec.field(default_factory=Limits)
    event_time: EventTime = msgspec.field(default_factory=EventTime)
    http: Http = msgspec.field(default_factory=Http)
    state: State = msgspec.field(default_factory=State)
    jobs: Jobs = msgspec.field(default_factory=Jobs)
    respond: Respond = msgspec.field(default_factory=Respond)
    logging: Logging = msgspec.field(default_factory=Logging)
    source: str = "<defaults>"  # the file it came from, for messages; not a YAML key

    def watches(self, model: str) -> bool:
        if any(fnmatch.fnmatchcase(model, glob) for glob in self.models.ignore):
            return False
        return any(fnmatch.fnmatchcase(model, glob) for glob in self.models.watch)

    def model_labels(self, model: str) -> dict[str, str]:
        """The labels of the first override matching ``model`` (as for detectors)."""
        for override in self.models.overrides:
            if fnmatch.fnmatchcase(model, override.model):
                return dict(override.labels)
        return {}

    def detector_params(self, model: str) -> dict[str, dict[str, Any]]:
        """The detectors that run on ``model`` and their parameters, overrides applied (first match wins)."""
        chosen = {name: dict(params) for name, params in self.detectors.items()}
        for override in self.models.overrides:
            if not fnmatch.fnmatchcase(model, override.model):
                continue
            for name, params in override.detectors.items():
                if params is False:
                    chosen.pop(name, None)
                elif params is True:
                    chosen.setdefault(name, {})
                else:
                    chosen[name] = {**chosen.get(name, {}), **params}
            break
        return chosen


def _yaml_path(msgspec_path: str) -> str:
    return msgspec_path.replace("`", "")


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read, validate and return the config; ``overrides`` maps dotted keys to command-line values."""
    source = str(path) if path else "<defaults>"
    raw: Any = {}
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read the config file: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start}); a config is a YAML file") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{source}:{where}: not valid YAML: {problem}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: $: expected a mapping of sections (kafka, models, ...), got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: $.{key}: expected a mapping")
        node[leaf] = value
    try:
        config = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as exc:
        message = describe_validation_error(str(exc))
        path = message.split(":", 1)[0]
        if any(path == f"$.{key}" or path.startswith(f"$.{key}.") for key in (overrides or {})):
            message += " (the value comes from a command-line flag)"
        raise ConfigError(f"{source}: {message}") from None
    config.source = source
    _check_semantics(config)
    return config


def describe_validation_error(message: str, root: Any = None) -> str:
    """msgspec says "Expected `int`, got `str` - at `$.kafka.poll.max_records`"; lead with the path,
    and for an unknown key or a bad choice, say what is allowed there (in ``root``, a Struct type:
    the config, or a detector's parameters)."""
    what, where = message.rsplit(" - at ", 1) if " - at " in message else (message, "`$`")
    path = _yaml_path(where)
    allowed = _allowed_at(path, Config if root is None else root)
    if what.startswith("Object contains unknown field") and isinstance(allowed, tuple):
        what += f"; known keys here: {', '.join(allowed)}"
    elif what.startswith("Invalid enum value") and isinstance(allowed, list):
        what += f"; expected one of: {', '.join(map(str, allowed))}"
    return f"{path}: {what}"


def _allowed_at(path: str, root: Any) -> tuple[str, ...] | list[Any] | None:
    """The keys (a tuple) or the choices (a list) the schema allows at a YAML path, if it knows."""
    import msgspec.inspect as schema

    node: Any = schema.type_info(root)
    for part in re.findall(r"\.(\w+)|\[", path):
        if isinstance(node, schema.UnionType):
            node = next((t for t in node.types if not isinstance(t, schema.NoneType)), node)
        if part == "":  # [index]
            node = getattr(node, "item_type", None)
        elif isinstance(node, schema.StructType):
            node = next((f.type for f in node.fields if f.name == part), None)
        else:
            return None
    if isinstance(node, schema.StructType):
        return tuple(f.name for f in node.fields)
    if isinstance(node, schema.LiteralType):
        return list(node.values)
    return None


def _check_semantics(config: Config) -> None:
    from monitor.detectors import registry  # detectors import config types, not the reverse at import time

    where = config.source
    for key in ("ack_timeout",):
        _duration(where, f"$.kafka.{key}", getattr(config.kafka, key))
    if _duration(where, "$.state.checkpoint_interval", config.state.checkpoint_interval) < 1:
        raise ConfigError(f"{where}: $.state.checkpoint_interval: expected at least 1s")
    if _duration(where, "$.kafka.ack_timeout", config.kafka.ack_timeout) <= 0:
        raise ConfigError(f"{where}: $.kafka.ack_timeout: expected more than 0s")
    _check_jobs(config)
    if config.event_time.tick is not None and _duration(where, "$.event_time.tick", config.event_time.tick) <= 0:
        raise ConfigError(f"{where}: $.event_time.tick: expected more than 0s, or null for batches as polled")
    if _duration(where, "$.event_time.max_batch_span", config.event_time.max_batch_span) <= 0:
        raise ConfigError(f"{where}: $.event_time.max_batch_span: expected more than 0s")
    if _duration(where, "$.event_time.flush_after", config.event_time.flush_after) <= 0:
        raise ConfigError(f"{where}: $.event_time.flush_after: expected more than 0s")
    for key in ("http_timeout", "outbox_max_age", "journal_retention"):
        if _duration(where, f"$.respond.{key}", getattr(config.respond, key)) <= 0:
            raise ConfigError(f"{where}: $.respond.{key}: expected more than 0s")
    if not config.kafka.bootstrap_servers:
        raise ConfigError(f"{where}: $.kafka.bootstrap_servers: expected at least one host:port")
    for i, server in enumerate(config.kafka.bootstrap_servers):
        match = re.match(r"^[^\s:]+:(\d{1,5})$", server)
        if not match or not 1 <= int(match.group(1)) <= 65535:
            raise ConfigError(f"{where}: $.kafka.bootstrap_servers[{i}]: expected host:port, got {server!r}")
    topics = config.kafka.topics
    if len({topics.logs, topics.dead_letters, topics.detections}) != 3:
        raise ConfigError(f"{where}: $.kafka.topics: logs, dead_letters and detections must be three different topics")
    if config.respond.denylist_topic in (topics.logs, topics.dead_letters, topics.detections):
        raise ConfigError(f"{where}: $.respond.denylist_topic: must differ from the kafka.topics")
    if config.respond.group_id == config.kafka.group_id:
        raise ConfigError(f"{where}: $.respond.group_id: must differ from kafka.group_id (each stage is its own "
                          "consumer group)")
    from monitor.sources.kafka import check_security_keys

    check_security_keys(config)
    for name, params in config.detectors.items():
        registry.check_params(name, params, f"{where}: $.detectors.{name}")
    for i, override in enumerate(config.models.overrides):
        for name, params in override.detectors.items():
            path = f"{where}: $.models.overrides[{i}].detectors.{name}"
            if isinstance(params, bool):
                registry.check_name(name, path)
            else:
                merged = {**config.detectors.get(name, {}), **params}
                registry.check_params(name, merged, path)


def _check_jobs(config: Config) -> None:
    from urllib.parse import urlsplit

    where, jobs = config.source, config.jobs
    for key in ("evict_idle_clients", "reference_refresh"):
        value = getattr(jobs, key)
        if value is not None and _duration(where, f"$.jobs.{key}", value) < 1:
            raise ConfigError(f"{where}: $.jobs.{key}: expected at least 1s (or null: off)")
    if _duration(where, "$.jobs.scrape.every", jobs.scrape.every) < 1:
        raise ConfigError(f"{where}: $.jobs.scrape.every: expected at least 1s")
    timeout = _duration(where, "$.jobs.scrape.timeout", jobs.scrape.timeout)
    if not 0 < timeout < _duration(where, "$.jobs.scrape.every", jobs.scrape.every):
        raise ConfigError(f"{where}: $.jobs.scrape.timeout: expected more than 0s and less than every")
    names = set()
    for i, target in enumerate(jobs.scrape.targets):
        parts = urlsplit(target.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}: $.jobs.scrape.targets[{i}].url: expected an http(s)://host:port/path URL")
        if target.label() in names:
            raise ConfigError(f"{where}: $.jobs.scrape.targets[{i}]: two targets named {target.label()!r}; "
                              "give them different names")
        names.add(target.label())
        if not config.watches(target.model):
            raise ConfigError(f"{where}: $.jobs.scrape.targets[{i}].model: {target.model!r} is not watched (models.watch)")
        if "resource" not in config.detector_params(target.model):
            raise ConfigError(f"{where}: $.jobs.scrape.targets[{i}].model: the resource detector does not run on "
                              f"{target.model!r}; scraped figures feed it (add detectors.resource)")


def _duration(where: str, path: str, value: str | float) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {path}: {exc}") from None


seconds = parse_duration  # for durations load_config has already validated
