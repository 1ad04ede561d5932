"""What the aggregator counts, for Prometheus.

The service calls a :class:`Metrics` unconditionally; the base class records nothing, so `simulate`, the
tests and an aggregator without ``http`` pay nothing and never import prometheus-client.
:class:`PrometheusMetrics` imports it when constructed (only the aggregator's ``aggregator`` extra installs
it; a device never needs it) and keeps every metric in its own ``CollectorRegistry``: no process-global
state, so several services in one process (the tests) never share or clash.
"""

from __future__ import annotations

from typing import Any

from ..codec.chunking import DROP_REASONS

# Why updates are rejected, as a bounded label set (a free-text label would grow without limit).
REJECTION_REASONS = ("malformed_chunk", "oversized", "malformed", "wrong_sender", "no_open_round", "wrong_round",
                     "wrong_model_version", "second_update", "not_selected", "wrong_strategy", "bad_num_examples",
                     "wrong_tensors", "unsigned", "unknown_device", "wrong_key", "tampered", "out_of_range",
                     "norm_too_large", "other")
# The signature refusals are codec.signing.Refusal's values: unsigned, unknown_device (not enrolled or revoked),
# wrong_key (intact but signed by another key: a forgery), tampered (changed after signing).

# rounds.judge explains a refusal in words; these fragments of its sentences name the reason.
_JUDGE_FRAGMENTS = (("no round is open", "no_open_round"), ("late or early", "wrong_round"),
                    ("trained from model version", "wrong_model_version"), ("already delivered", "second_update"),
                    ("not selected", "not_selected"), ("the fleet runs", "wrong_strategy"),
                    ("num_examples", "bad_num_examples"), ("tensor", "wrong_tensors"))

# What a device may report refusing (agent/service.py `refuse`): a model, a task, its own diverged training, or a
# message that raised.
DEVICE_REFUSAL_KINDS = ("model", "task", "training", "error")

# Round durations: from a local fleet that closes in milliseconds to the deadlines of a slow field fleet.
DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

INSTALL_HINT = "pip install 'edge-fl[aggregator]' (or pip install prometheus-client)"


def judge_reason(text: str) -> str:
    """The label of a refusal sentence from :func:`edge_agent.aggregator.rounds.judge`."""
    for fragment, label in _JUDGE_FRAGMENTS:
        if fragment in text:
            return label
    return "other"


class Metrics:
    """Records nothing: the default, and what `simulate` uses."""

    def round_opened(self, round_no: int) -> None:
        pass

    def round_resumed(self, round_no: int) -> None:
        """A restarted aggregator found `round_no` in its state (not opened again)."""

    def round_closed(self, succeeded: bool, duration_s: float) -> None:
        pass

    def update_accepted(self) -> None:
        pass

    def update_rejected(self, reason: str) -> None:
        pass

    def update_duplicate(self) -> None:
        pass

    def bytes_received(self, n: int) -> None:
        pass

    def partial_dropped(self, reason: str) -> None:
        """A partial chunked message given up on; `reason` is one of codec.chunking.DROP_REASONS."""

    def partial_bytes(self, n: int) -> None:
        """Data bytes the aggregator now holds in partial chunked messages."""

    def global_refused(self) -> None:
        """A new global model failed learning/validate.py's checks: not published, the last good one stays."""

    def device_refused(self, kind: str) -> None:
        """A device reported refusing a model, a task or its own diverged training (`kind`, bounded label)."""

    def update_clipped(self) -> None:
        """An accepted update whose change was scaled down to the round's norm bound ([aggregator] clip)."""

    def norm_bound(self, bound: float) -> None:
        """The norm bound the next round announces."""

    def dp_epsilon(self, epsilon: float) -> None:
        """The differential-privacy budget spent so far (epsilon at [aggregator] dp_delta)."""

    def devices_online(self, n: int) -> None:
        pass

    def model_version(self, version: int) -> None:
        pass

    def exposition(self) -> tuple[bytes, str] | None:
        """The text format and its content type, or None when nothing is recorded."""
        return None


class PrometheusMetrics(Metrics):
    """The aggregator's metrics in a private registry, served at ``/metrics`` by :mod:`.web`."""

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise RuntimeError(f"the aggregator's metrics need prometheus-client: {INSTALL_HINT}") from None
        self._prom: Any = prom
        r = self.registry = prom.CollectorRegistry()
        self.rounds_opened = prom.Counter("edgefl_rounds_opened", "Rounds opened", registry=r)
        self.rounds_closed = prom.Counter("edgefl_rounds_closed", "Rounds closed (succeeded or failed)", registry=r)
        self.rounds_failed = prom.Counter("edgefl_rounds_failed",
                                          "Rounds closed without enough updates (no new version)", registry=r)
        self.updates_accepted = prom.Counter("edgefl_updates_accepted", "Updates counted into a round", registry=r)
        self.updates_rejected = prom.Counter("edgefl_updates_rejected", "Updates refused, by reason", ["reason"],
                                             registry=r)
        self.updates_duplicate = prom.Counter("edgefl_updates_duplicate",
                                              "Redeliveries of updates already counted (MQTT QoS 1)", registry=r)
        self.bytes_in = prom.Counter("edgefl_update_bytes_received", "Bytes of update messages received",
                                     registry=r)
        self.round_duration = prom.Histogram("edgefl_round_duration_seconds", "From opening to closing a round",
                                             buckets=DURATION_BUCKETS, registry=r)
        self.online = prom.Gauge("edgefl_devices_online", "Devices whose retained presence is online", registry=r)
        self.current_round = prom.Gauge("edgefl_current_round", "The last round opened (0: none yet)", registry=r)
        self.version = prom.Gauge("edgefl_global_model_version", "Version of the latest global head", registry=r)
        for reason in REJECTION_REASONS:  # every reason shows, at 0, before the first refusal
            self.updates_rejected.labels(reason=reason)
        self.updates_clipped = prom.Counter("edgefl_updates_clipped", "Updates scaled down to the round's norm bound",
                                            registry=r)
        self.update_norm_bound = prom.Gauge("edgefl_update_norm_bound", "Norm bound on an update's change, next round",
                                            registry=r)
        self.privacy_epsilon = prom.Gauge("edgefl_dp_epsilon", "Differential-privacy budget spent (epsilon)",
                                          registry=r)
        self.partials_dropped = prom.Counter("edgefl_partial_messages_dropped",
                                             "Partial chunked updates given up on, by reason", ["reason"], registry=r)
        for reason in DROP_REASONS:
            self.partials_dropped.labels(reason=reason)
        self.globals_refused = prom.Counter("edgefl_global_models_refused",
                                            "New global models that failed validation (not published)", registry=r)
        self.devices_refused = prom.Counter("edgefl_device_refusals", "Refusals devices reported, by kind",
                                            ["kind"], registry=r)
        for kind in DEVICE_REFUSAL_KINDS:
            self.devices_refused.labels(kind=kind)
        self.partial_held = prom.Gauge("edgefl_partial_message_bytes", "Data bytes held in partial chunked updates",
                                       registry=r)

    def round_opened(self, round_no: int) -> None:
        self.rounds_opened.inc()
        self.current_round.set(round_no)

    def round_resumed(self, round_no: int) -> None:
        self.current_round.set(round_no)

    def round_closed(self, succeeded: bool, duration_s: float) -> None:
        self.rounds_closed.inc()
        if not succeeded:
            self.rounds_failed.inc()
        self.round_duration.observe(max(0.0, duration_s))

    def update_accepted(self) -> None:
        self.updates_accepted.inc()

    def update_rejected(self, reason: str) -> None:
        self.updates_rejected.labels(reason=reason if reason in REJECTION_REASONS else "other").inc()

    def update_duplicate(self) -> None:
        self.updates_duplicate.inc()

    def bytes_received(self, n: int) -> None:
        self.bytes_in.inc(n)

    def partial_dropped(self, reason: str) -> None:
        self.partials_dropped.labels(reason=reason if reason in DROP_REASONS else DROP_REASONS[0]).inc()

    def partial_bytes(self, n: int) -> None:
        self.partial_held.set(n)

    def global_refused(self) -> None:
        self.globals_refused.inc()

    def device_refused(self, kind: str) -> None:
        self.devices_refused.labels(kind=kind if kind in DEVICE_REFUSAL_KINDS else "error").inc()

    def update_clipped(self) -> None:
        self.updates_clipped.inc()

    def norm_bound(self, bound: float) -> None:
        self.update_norm_bound.set(bound)

    def dp_epsilon(self, epsilon: float) -> None:
        self.privacy_epsilon.set(epsilon)

    def devices_online(self, n: int) -> None:
        self.online.set(n)

    def model_version(self, version: int) -> None:
        self.version.set(version)

    def exposition(self) -> tuple[bytes, str]:
        return bytes(self._prom.generate_latest(self.registry)), str(self._prom.CONTENT_TYPE_LATEST)
