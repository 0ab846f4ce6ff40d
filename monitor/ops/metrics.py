"""The daemon's Prometheus metrics, in one registry so tests and the HTTP endpoint see the same set.

Label values are bounded: models beyond ``limits.max_models`` share the label ``__other__``, dead-letter
reasons come from a fixed list, and nothing a client sends becomes a label value unchecked.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

# The *_created samples double the exposition and no dashboard uses them.
disable_created_metrics()

OTHER_MODEL = "__other__"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            "inferwatch_events", "Inference-log events by model and outcome (processed, ignored, untracked, dead_letter)",
            ["model", "outcome"], registry=r)
        self.dead_letters = Counter(
            "inferwatch_dead_letters", "Messages sent to the dead-letter destination, by reason", ["reason"], registry=r)
        self.detections = Counter(
            "inferwatch_detections", "Detections emitted", ["model", "detector", "kind", "severity"], registry=r)
        self.batch_seconds = Histogram(
            "inferwatch_batch_seconds", "Time to decode, detect and publish one polled batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.batch_events = Histogram(
            "inferwatch_batch_events", "Messages per polled batch",
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 50000), registry=r)
        self.consumer_lag = Gauge(
            "inferwatch_consumer_lag", "Messages between the partition's high watermark and the consumer position",
            ["topic", "partition"], registry=r)
        self.events_held = Gauge(
            "inferwatch_events_held", "Events waiting for their model's newest tick of event time to complete "
            "(event_time.tick)", registry=r)
        self.last_event_ts = Gauge(
            "inferwatch_last_event_timestamp_seconds", "Event time of the newest event seen, per model",
            ["model"], registry=r)
        self.models_tracked = Gauge(
            "inferwatch_models_tracked", "Models with detectors built (bounded by limits.max_models)", registry=r)
        self.clients_tracked = Gauge(
            "inferwatch_clients_tracked", "Clients a per-client detector holds state for (bounded by its max_clients)",
            ["model", "detector"], registry=r)
        self.clients_untracked = Counter(
            "inferwatch_untracked_queries", "Queries of clients a per-client detector could not track: its table "
            "was full of suspicious clients", ["model", "detector"], registry=r)
        self.detector_errors = Counter(
            "inferwatch_detector_errors", "Batches a detector failed on (a bug: see the log)", ["detector"], registry=r)
        self.publish_failures = Counter(
            "inferwatch_publish_failures", "Attempts to publish a batch's detections and dead letters that failed",
            registry=r)
        self.commit_failures = Counter(
            "inferwatch_commit_failures", "Offset commits that failed (the batch is retried or redelivered)", registry=r)
        self.broker_up = Gauge(
            "inferwatch_broker_up", "1 while the daemon reaches the Kafka broker", registry=r)
        self.ready = Gauge("inferwatch_ready", "1 while /readyz answers 200", registry=r)
        self.job_last_run = Gauge(
            "inferwatch_job_last_run_timestamp_seconds", "When a scheduled job last finished", ["job"], registry=r)
        self.job_failures = Counter(
            "inferwatch_job_failures", "Scheduled job runs that raised", ["job"], registry=r)
        self.scrape_up = Gauge(
            "inferwatch_scrape_up", "1 when the last scrape of a model server's metrics worked", ["target"], registry=r)
        self.server_resource = Gauge(
            "inferwatch_server_resource", "A model server's figure from its last scrape (cpu_cores, memory_mb, "
            "gpu_utilization)", ["model", "target", "figure"], registry=r)
        self.checkpoint_seconds = Gauge(
            "inferwatch_checkpoint_duration_seconds", "Time the last state checkpoint took", registry=r)
        # The respond stage (playbooks). Label values: playbook names and action names come from the
        # loaded playbooks, states and outcomes from fixed lists.
        self.respond_incidents = Counter(
            "inferwatch_incidents", "Detections matched by a playbook, by outcome (opened, joined an open incident, "
            "cooldown, limited by the playbook's run budget, resolved)", ["playbook", "outcome"], registry=r)
        self.respond_steps = Counter(
            "inferwatch_playbook_steps", "Playbook steps by the state they reached", ["action", "state"], registry=r)
        self.respond_notifications = Counter(
            "inferwatch_notifications", "Outbox deliveries (alerts and all-clears) by outcome (delivered, retried, "
            "failed)", ["action", "outcome"], registry=r)
        self.respond_playbook_reloads = Counter(
            "inferwatch_playbook_reloads", "Playbook reloads (SIGHUP or a changed file), loaded or failed (the old "
            "set kept)", ["outcome"], registry=r)
        self.playbooks_loaded = Gauge("inferwatch_playbooks_loaded", "Playbooks in force", registry=r)
        self.outbox_queued = Gauge(
            "inferwatch_outbox_queued", "Notifications waiting in the outbox for delivery", registry=r)
        self.approvals_pending = Gauge(
            "inferwatch_approvals_pending", "Playbook steps waiting for an operator's approval", registry=r)
        self.build = Info("inferwatch_build", "Version of the running daemon", registry=r)
        # The operator surface (monitor.ops.inventory): one series per model and version in the inventory,
        # at most limits.max_models x inventory.MAX_VERSIONS.
        self.model_info = Info(
            "inferwatch_model", "A model version the detect stage watches, with its detectors", ["model", "version"],
            registry=r)
        self.model_clients = Gauge(
            "inferwatch_model_clients", "Distinct clients seen per model (HyperLogLog estimate, about 2% error), "
            "as of the last checkpoint", ["model"], registry=r)
