"""The device agent service: a thin shell around the strategies, the agent store and the MQTT link.

One thread runs this loop; paho's network thread only fills the link's inbox. The loop:
- announces presence (retained "online", "offline" as last will),
- on a round task that selects this device: trains once per round and commits the new personal state
  with the encoded update to the outbox in one transaction, then uploads;
- on a new global version: evaluates its heads on its own held-out data and reports telemetry;
- uploads whatever the outbox holds whenever it is connected, the first time after the delay the task's
  upload window gives this device (fleet.upload_delay), and again, with a doubling timeout and after every
  reconnection, until the aggregator's receipt for it arrives on `Topics.receipt(device)` or its round is
  over (edge_agent/receipts.py; agent/store.py for when an update leaves the outbox).

With `[signing]` configured, updates are signed with the device's key, and a task or model counts only if
signed with one of the fleet keys the device was enrolled with. Whatever the signatures, a task or model
older than the newest one accepted (round or version, kept in the store across restarts) is refused as a
rollback.

A signature says who sent a model, not that it is sane: the fleet key is an insider. Every global model and
task is checked (learning/validate.py: shapes the strategy expects, finite, within the magnitude bound the
task announces) before it is used or raises the high-water mark, and so is what a training step produced
before it is committed. A refusal is logged, counted (`refusals`) and reported in telemetry; the device keeps
its last good state. Nothing a message holds may end the process: under systemd a crash on a retained
message is a crash loop, and a crash loop on every device is a fleet outage.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import sqlite3
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..codec.chunking import split_message
from ..codec.compression import ErrorFeedback
from ..codec.digest import sha256
from ..codec.downlink import DownlinkError, apply_delta, model_digest
from ..codec.envelope import Envelope, EnvelopeError, Kind, decode_envelope, encode_envelope
from ..codec.signing import Purpose, Refusal, context, key_id, signer, verify
from ..codec.update_frame import frame_seeds, pack_update_frame
from ..config import AgentConfig, ConfigError
from ..db import MEMORY
from ..faults import crash_point
from ..fleet import (
    FleetMessageError,
    GlobalModel,
    RoundTask,
    Signer,
    decode_global,
    decode_task,
    encode_global,
    update_base,
)
from ..keys import KeyFileError, load_fleet_keys, load_private_key
from ..learning import rng
from ..learning.head import Int8Head, quantize_head
from ..learning.metrics import accuracy
from ..learning.strategies import (
    ClientData,
    ClientDataError,
    ClientState,
    ClientUpdate,
    Strategy,
    check_client_data,
)
from ..learning.validate import check_head_config, effective_bound, expected_shapes, head_problem
from ..messaging import (
    NO_MATCHING_SUBSCRIBERS,
    BrokerLink,
    ConnectionEvent,
    LinkFactory,
    Message,
    MqttError,
    PublishError,
)
from ..protocol import Topics
from ..receipts import ReceiptError, UploadSchedule, decode_receipt
from ..transport import MqttLink
from .sources import DataSource, open_source
from .store import AgentStore, OutboxItem, Residual

log = logging.getLogger("edge_fl.agent")
# Refusals reported to the aggregator: each (kind, version, round) once, and at most this many a minute, so a
# flood of bad messages costs the device a log line each, not a publish each.
REFUSAL_REPORTS_PER_MINUTE = 10
# Error feedback's residual is dropped when the update it was kept for trained from a global model more than this
# many versions older than the one the device trains from now (a device that was away for many rounds).
MAX_RESIDUAL_AGE = 8
MAX_FRAME_EXAMPLES = 2**32 - 1  # a compact update frame's u32 (the aggregator caps far below: max_examples)
# With a downlink codec: how long a task waits for the retained changes that bring the held model to its version
# before the device reads the whole model instead (they arrive at once unless one is missing: a recovered model).
DELTA_WAIT_S = 10.0
MAX_BUFFERED_DELTAS = 64  # changes ahead of the held model, waiting for the ones before them


def _message_id(update_id: str) -> bytes:
    h = sha256()
    h.update(update_id.encode())
    return bytes(h.digest()[:16])


class AgentService:
    def __init__(self, cfg: AgentConfig, source: DataSource | None = None, *,
                 link_factory: LinkFactory = MqttLink, clock: Callable[[], float] = time.time,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock  # compared with a task's deadline, which the aggregator's clock set
        self.timer = timer  # for waits (upload window, receipt timeouts): a wall clock set back must not stretch them
        self.uploads = UploadSchedule(cfg.upload.receipt_timeout_s, cfg.upload.max_receipt_timeout_s)
        self.topics = Topics(cfg.fleet)
        self.store = AgentStore(MEMORY if cfg.state_dir == MEMORY else Path(cfg.state_dir) / "agent.db")
        self.waiting: RoundTask | None = None  # a round task that arrived before enough local data
        self._checked: tuple[ClientData, tuple[int, int]] | None = None  # the data that passed the check
        self.source = source if source is not None else open_source(cfg, self.store)
        b = cfg.broker
        self.link: BrokerLink = link_factory(
            cfg.device_id, b.host, b.port, username=b.username, password=b.secret(),
            will=(self.topics.presence(cfg.device_id), b"offline", True), clean_start=False,
            max_payload_bytes=b.max_payload_bytes, keepalive_s=b.keepalive_s, tls=b.tls.options(),
            topic_aliases=b.topic_aliases)
        self.lost_at: float | None = None  # monotonic time the broker connection was lost (for the reconnect log)
        self.refusals: Counter[str] = Counter()  # refused models, tasks, diverged trainings, messages that raised
        self._reported: deque[tuple[str, int, int]] = deque(maxlen=64)
        self._report_times: deque[float] = deque(maxlen=REFUSAL_REPORTS_PER_MINUTE)
        s = cfg.signing
        self.sign_update: Signer | None = None
        self.fleet_keys: list[Ed25519PublicKey] = []  # current first; the next one during a fleet key rotation
        self.require_signatures = bool(s.key) and s.required
        self.contexts = {self.topics.round_current: context(Purpose.TASK, cfg.fleet),
                         self.topics.model_current: context(Purpose.MODEL, cfg.fleet)}
        # The global model when versions go down as deltas (codec/downlink.py): the one held, changes that came
        # ahead of it, whether model/current is subscribed (to start, to resync, or in a fleet without deltas),
        # and since when a task waits for the changes that bring the held model to its version.
        self.held: GlobalModel | None = self._load_held()
        self.deltas: dict[int, bytes] = {}
        self.whole_models = False
        self.behind_since: float | None = None
        self.held_whole = False  # the held model came whole from model/current (not rebuilt from changes)
        self.refused_digests: deque[str] = deque(maxlen=16)  # tasks naming a model that model/current is not
        if s.key:
            try:
                self.fleet_keys = load_fleet_keys(s.fleet_keys)
                device_key = load_private_key(s.key)
            except KeyFileError as exc:
                raise ConfigError(f"[signing]: {exc}") from None
            self.sign_update = signer(device_key, context(Purpose.UPDATE, cfg.fleet))
            log.info("signatures on: updates signed with key %s; tasks and models must be signed by fleet key %s",
                     key_id(device_key.public_key()), " or ".join(key_id(k) for k in self.fleet_keys))

    # --- decisions ------------------------------------------------------------------------------
    def _state(self, model: GlobalModel, strategy: Strategy) -> ClientState:
        state = self.store.client_state()
        problem = None if state is None else head_problem(state.personal, None, max_abs=effective_bound(model.max_abs),
                                                          what="the stored personal head")
        if problem is not None:  # written before this device checked its training: start it afresh
            log.error("%s; starting the personal head afresh", problem)
            state = None
        if state is None:
            state = strategy.init_client(rng.client_init(model.training.seed, self.cfg.rng_stream))
            self.store.save_initial_state(state)
        return state

    def _check(self, data: ClientData, model: GlobalModel) -> None:
        """check_client_data, once per data object and head shape (fixed data is checked once, not per round)."""
        shape = (model.head.num_classes, model.head.in_dim)
        if self._checked is not None and self._checked[0] is data and self._checked[1] == shape:
            return
        check_client_data(self.cfg.device_id, data, num_classes=shape[0], dim=shape[1])
        self._checked = (data, shape)

    def data(self) -> ClientData | None:
        """The device's data now: fixed for the bundled recordings, growing for an attached MCU."""
        return self.source.client_data()

    def personal_head(self, model: GlobalModel, data: ClientData) -> Int8Head:
        """The int8 head this device scores (and uses) under global `model`: its strategy's personalized head
        of the stored state, with the version's own generator."""
        strategy = model.strategy()
        personal = strategy.personalized(model.server(), self._state(model, strategy), data,
                                         rng.personalize(model.training.seed, model.version, self.cfg.rng_stream))
        return quantize_head(personal)

    def evaluate(self, model: GlobalModel, data: ClientData | None = None) -> None:
        """Score this device's heads under global `model` on its own held-out data, once per version."""
        version = model.version
        if self.store.evaluated(version):
            return
        data = data or self.data()
        if data is None or data.y_test.size == 0:
            return
        try:  # scoring may fine-tune on the data (fedavg-ft, ncm): what train() refuses is refused here too
            self._check(data, model)
        except ClientDataError as exc:
            log.error("version %d: not evaluating: %s", version, exc)
            return
        report: dict[str, Any] = {
            "device": self.cfg.device_id, "version": version, "n_test": int(data.y_test.size),
            "personal_acc": accuracy(self.personal_head(model, data).predict(data.x_test), data.y_test),
            "global_acc": None,
        }
        glob = model.strategy().new_user_head(model.server())
        if glob is not None:
            report["global_acc"] = accuracy(quantize_head(glob).predict(data.x_test), data.y_test)
        traffic = self.link.socket_traffic()
        if traffic is not None:  # what this device paid for so far, on the wire (edge-fl demo sums it per round)
            report["socket_bytes_sent"], report["socket_bytes_received"] = traffic
        text = json.dumps(report)
        self.store.record_evaluation(version, text)
        self._send_telemetry(text)

    def model_problem(self, model: GlobalModel) -> str | None:
        """Why this device must not use `model` (the global model of a task or of model/current), or None."""
        what = f"global model version {model.version}"
        try:
            check_head_config(model.head, what=what)
            shapes = expected_shapes(model.head, model.strategy().shared_keys)
        except ValueError as exc:  # InvalidHeadError, or a strategy this head cannot run
            return str(exc)
        return head_problem(model.params, shapes, max_abs=effective_bound(model.max_abs), what=what)

    @staticmethod
    def training_problem(model: GlobalModel, state: ClientState, update: ClientUpdate | None) -> str | None:
        """Why what a training step produced must not be committed (it diverged), or None."""
        bound = effective_bound(model.max_abs)
        problem = head_problem(state.personal, None, max_abs=bound, what="the new personal head")
        if problem is None and update is not None:
            head = {k: v for k, v in update.tensors.items() if k in model.head.shapes}
            stats = {k: v for k, v in update.tensors.items() if k not in model.head.shapes}  # sums: finite only
            problem = (head_problem(head, None, max_abs=bound, what="the update")
                       or head_problem(stats, None, max_abs=math.inf, what="the update"))
        return problem

    def refuse(self, kind: str, version: int, round_no: int, reason: str) -> None:
        """Log and count a refusal (kind: model, task, training, error) and report it in telemetry."""
        self.refusals[kind] += 1
        log.error("refused %s (round %d, model version %d): %s; this device keeps its last good state",
                  {"training": "the result of training"}.get(kind, f"a {kind}"), round_no, version, reason)
        key = (kind, version, round_no)
        now = time.monotonic()
        if key in self._reported or (len(self._report_times) == self._report_times.maxlen
                                     and now - self._report_times[0] < 60.0):
            return
        self._reported.append(key)
        self._report_times.append(now)
        self._send_telemetry(json.dumps({"device": self.cfg.device_id, "version": version, "round": round_no,
                                         "refused": kind, "reason": reason[:500]}))

    def _send_telemetry(self, text: str) -> None:
        try:
            self.link.publish(self.topics.telemetry(self.cfg.device_id), text.encode(), qos=1, timeout=5.0)
        except MqttError as exc:
            log.warning("telemetry not sent (%s); the evaluation is kept in the local state", exc)

    def train(self, task: RoundTask) -> None:
        round_no = task.round
        started = self.timer()
        if not task.selects(self.cfg.device_id):
            log.info("round %d: not selected", round_no)
            return
        if self.clock() > task.deadline:  # an update now would only be refused as late: keep the CPU
            log.warning("round %d: its deadline passed %.0f s ago (by this device's clock); not training",
                        round_no, self.clock() - task.deadline)
            self.waiting = None
            return
        data = self.data()
        if data is None:
            log.info("round %d: not enough local data yet; will train when there is", round_no)
            self.waiting = task  # retried from the idle loop as windows arrive
            return
        self.waiting = None
        model = task.model
        try:
            self._check(data, model)
        except ClientDataError as exc:  # never upload what would poison the fleet; the round goes on without us
            log.error("round %d: not training: %s", round_no, exc)
            return
        self.evaluate(model, data)  # the task carries the global head of the last round: score it before training
        if self.store.trained(round_no):
            log.info("round %d: already trained, the update is in the outbox or delivered", round_no)
            return
        strategy, server = model.strategy(), model.server()
        state = self._state(model, strategy)
        t0 = time.perf_counter()
        with np.errstate(all="ignore"):  # an overflow shows in the check below, not as a warning per step
            state, update = strategy.client_round(server, state, data,
                                                  rng.client_round(model.training.seed, round_no, self.cfg.rng_stream))
        problem = self.training_problem(model, state, update)
        if problem is not None:  # rolled back: nothing is committed, the stored state is the last good one
            self.refuse("training", model.version, round_no, f"training diverged: {problem}")
            return
        item, residual = None, None
        if update is not None:
            update_id = uuid.uuid4().hex
            if model.update_codec is None:
                envelope = Envelope(
                    kind=Kind.UPDATE, device_id=self.cfg.device_id, round=round_no, model_version=model.version,
                    strategy=strategy.name, update_id=update_id, num_examples=update.num_examples,
                    tensors=update.tensors, codec=model.codec)
                payload = encode_envelope(envelope, sign=self.sign_update)
            else:
                payload, residual = self.compress(model, round_no, update_id, update)
            item = OutboxItem(update_id, round_no, self.topics.update(self.cfg.device_id, round_no), payload,
                              task.deadline)
        self.store.commit_round(round_no, model.version, state, item, residual)
        crash_point("agent.after_commit", round_no)
        queued = f", update {item.update_id} ({len(item.payload)} B) queued" if item else ""
        delay = task.upload_delay(self.cfg.device_id)
        if item is not None and delay > 0:  # the task's upload window: the fleet's uploads must not come as one burst
            self.uploads.hold(item.update_id, started + delay)
            queued += f", to be sent {delay:.1f} s after the task (upload window {task.upload_window_s:g} s)"
        if item is not None and task.retry_after_s > 0:  # the aggregator steers when devices come back
            self.uploads.pace(item.update_id, task.retry_delay(self.cfg.device_id))
        log.info("round %d: trained on %d windows in %.0f ms%s", round_no, data.y_train.size,
                 1000 * (time.perf_counter() - t0), queued)
        if self.source.runs_heads:  # an attached MCU runs this device's new personalized head
            self.source.push(strategy.personalized(server, state, data,
                                                   rng.personalize(model.training.seed, round_no, self.cfg.rng_stream)))

    def compress(self, model: GlobalModel, round_no: int, update_id: str,
                 update: ClientUpdate) -> tuple[bytes, Residual]:
        """The update as the round's codec sends it: the change from the global model plus what earlier rounds'
        compression left out (error feedback), in a compact update frame; and the residual to keep with it."""
        spec = model.update_codec
        assert spec is not None
        shapes = model.strategy().upload_shapes(model.server())
        base = update_base(model.params, shapes)
        delta = {k: np.asarray(update.tensors[k], np.float32) - base[k] for k in shapes}
        feedback = self.error_feedback(model, str(spec), shapes)
        seed_of = frame_seeds(self.cfg.device_id)
        encoded, _ = feedback.compress(delta, spec, {k: seed_of(round_no, update_id, k) for k in shapes})
        payload = pack_update_frame(round_no=round_no, model_version=model.version, update_id=update_id,
                                    num_examples=min(update.num_examples, MAX_FRAME_EXAMPLES), codec=spec,
                                    encoded=encoded, shapes=shapes, sign=self.sign_update)
        return payload, Residual(str(spec), model.version, feedback.to_arrays())

    def error_feedback(self, model: GlobalModel, codec: str, shapes: Mapping[str, tuple[int, ...]]) -> ErrorFeedback:
        """The residual of earlier rounds, unless it no longer means anything (store.Residual.stale)."""
        saved = self.store.residual()
        if saved is None:
            return ErrorFeedback()
        why = saved.stale(codec, shapes, model.version, MAX_RESIDUAL_AGE)
        if why is not None:
            log.info("error feedback starts again: %s", why)
            return ErrorFeedback()
        return ErrorFeedback.from_arrays(saved.arrays)

    def flush_outbox(self, *, resend: bool = False) -> None:
        """Send what the outbox holds that no broker took yet (`resend`: also what one took, which may be lost):
        at once, except an update whose first send waits for its place in the round's upload window, and one
        whose task said when to come back (a re-announced task must not bring the whole fleet back at once)."""
        now = self.timer()
        for item in self.store.outbox(include_sent=resend):
            waits = self.uploads.sends(item.update_id) == 0 or self.uploads.steered(item.update_id)
            if waits and not self.uploads.due(item.update_id, now):
                continue
            if not self.send(item):
                return

    def send_due(self) -> None:
        """Send each update whose time came: its first send (after its upload window delay), a send that failed,
        or a send the aggregator has not confirmed with a receipt within the timeout."""
        now = self.timer()
        for item in self.store.outbox(include_sent=True):
            if not self.uploads.due(item.update_id, now):
                continue
            sends = self.uploads.sends(item.update_id)
            if sends:
                log.info("update %s for round %d: no receipt from the aggregator after %d send(s); sending it again",
                         item.update_id, item.round, sends)
            if not self.send(item):
                return

    def send(self, item: OutboxItem) -> bool:
        """Publish one update (in chunks if it is large); False if nothing more can be sent now."""
        if not self.link.connected:
            return False
        limit = self.cfg.broker.max_payload_bytes
        # Chunk ids derive from the update id: a resend after a crash is recognised as the same message.
        parts = [item.payload] if len(item.payload) <= limit else split_message(
            item.payload, message_id=_message_id(item.update_id), max_chunk_bytes=limit)
        try:
            for part in parts:
                rc = self.link.publish(item.topic, part, qos=1, timeout=10.0)
        except PublishError as exc:  # the broker answered, and said no: retrying will not change that
            log.error("update %s for round %d REFUSED by the broker: %s; it stays in the outbox, but nothing "
                      "this device sends will count until that is fixed", item.update_id, item.round, exc)
            return False
        except MqttError as exc:
            log.warning("update %s for round %d not delivered yet (%s); it stays in the outbox",
                        item.update_id, item.round, exc)
            return False
        crash_point("agent.after_puback", item.round)  # acknowledged by the broker, not yet marked here
        if rc == NO_MATCHING_SUBSCRIBERS:
            log.warning("update %s for round %d: the aggregator is not subscribed right now; will retry",
                        item.update_id, item.round)
            return False
        self.store.mark_sent(item.update_id)
        now = self.timer()
        again = self.uploads.sent(item.update_id, now) - now
        log.info("update %s for round %d taken by the broker (PUBACK reason code 0x%02x); sent again in %.0f s "
                 "unless the aggregator's receipt comes first", item.update_id, item.round, rc, again)
        return True

    def on_receipt(self, payload: bytes) -> None:
        """The aggregator's verdict on one of this device's updates: counted or refused, it leaves the outbox."""
        try:
            receipt = decode_receipt(payload)
        except ReceiptError as exc:
            log.warning("ignored a malformed receipt on %s: %s", self.topics.receipt(self.cfg.device_id), exc)
            return
        sends = self.uploads.sends(receipt.update_id)
        if not self.store.confirm(receipt.update_id, receipt.round):
            log.debug("receipt (%s) for update %s of round %d, which the outbox does not hold: ignored (a copy for "
                      "a resend, or an update given up on)", receipt.verdict, receipt.update_id, receipt.round)
            return
        self.uploads.forget(receipt.update_id)
        if receipt.verdict == "counted":
            log.info("update %s for round %d counted by the aggregator (after %d send(s))", receipt.update_id,
                     receipt.round, sends)
        else:
            log.warning("update %s for round %d REFUSED by the aggregator: %s; it leaves the outbox, not sent again",
                        receipt.update_id, receipt.round, receipt.reason or "no reason given")

    def give_up(self, forgotten: list[tuple[str, int]], why: str) -> None:
        """Updates dropped from the outbox without a receipt: they may or may not have been counted."""
        for update_id, round_no in forgotten:
            log.warning("update %s for round %d was never confirmed by the aggregator (no receipt after %d send(s)) "
                        "and %s: given up; it may not have been counted", update_id, round_no,
                        self.uploads.sends(update_id), why)
            self.uploads.forget(update_id)

    # --- the loop -------------------------------------------------------------------------------
    def handle(self, msg: Message | ConnectionEvent) -> None:
        if isinstance(msg, ConnectionEvent):
            if msg.connected:
                if self.lost_at is not None:
                    log.info("back on the broker after %.1f s (%s)", time.monotonic() - self.lost_at, msg.reason)
                    self.lost_at = None
                try:
                    self.link.publish_nowait(self.topics.presence(self.cfg.device_id), b"online", qos=1, retain=True)
                except MqttError as exc:
                    log.warning("presence not announced (%s)", exc)
                # A broker that crashed lost what it held: send the open round's update again.
                self.flush_outbox(resend=True)
            else:
                self.lost_at = time.monotonic()
                log.warning("lost connection to the broker: %s; reconnecting with backoff", msg.reason)
            return
        if msg.topic == self.topics.receipt(self.cfg.device_id):
            self.on_receipt(msg.payload)
            return
        delta_version = self.topics.version_of_delta(msg.topic)
        if delta_version is not None:
            if msg.payload and self.signed_by_fleet(msg):  # empty: a version no longer kept
                self.on_delta(delta_version, msg.payload)
            return
        if not msg.payload:
            if msg.topic == self.topics.round_current:  # the aggregator cleared the task: the fleet is done
                self.waiting = None
                self.give_up(self.store.forget_rounds_before(1 << 62), "the fleet finished its last round")
            return
        if msg.topic not in self.contexts or not self.signed_by_fleet(msg):
            return
        try:
            env = decode_envelope(msg.payload)
            if msg.topic == self.topics.round_current:
                task = decode_task(env)
            else:
                model = decode_global(env)
        except (EnvelopeError, FleetMessageError) as exc:
            log.error("ignored a malformed message on %s: %s", msg.topic, exc)
            return
        if msg.topic != self.topics.round_current:
            self.accept_model(model)
        elif not self.unresolved(task):
            self.subscribe_whole_models("the fleet sends the whole model with every task")
            self.accept_task(task)
        elif not self.rollback(task.model.version, task.round, msg.topic):
            self.waiting = None  # a newer task replaces one we could not train yet
            resolved = self.resolve(task)
            if resolved is None:
                self.waiting = task  # resolved from the idle loop once the model it names is here
            else:
                self.accept_task(resolved)

    def rollback(self, version: int, round_no: int | None, topic: str) -> bool:
        """Is a task (`round_no`) or model (None) of `version` older than what this device accepted? Logs it."""
        high_round, high_version = self.store.high_water()
        if version >= high_version and (round_no is None or round_no >= high_round):
            return False
        log.error("refused a rollback on %s: %s, but this device already accepted round %d and model version %d "
                  "(a replayed old message)", topic,
                  f"model version {version}" if round_no is None else f"round {round_no} from version {version}",
                  high_round, high_version)
        return True

    def accept_task(self, task: RoundTask) -> None:
        """A task whose model holds its tensors: checked, then trained for."""
        problem = self.model_problem(task.model)
        if problem is not None:
            self.refuse("task", task.model.version, task.round, problem)
            return
        if self.rollback(task.model.version, task.round, self.topics.round_current):
            return
        self.store.raise_high_water(task.round, task.model.version)
        self.waiting = None  # a newer task replaces one we could not train yet
        self.give_up(self.store.forget_rounds_before(task.round), f"round {task.round} began")
        self.train(task)
        # Also what was sent before: the aggregator publishes its task again when it (re)connects, and an
        # update sent while it was away may be lost (a broker crash) or acknowledged with nobody to get it.
        self.flush_outbox(resend=True)

    def accept_model(self, model: GlobalModel) -> None:
        """A whole global model (model/current): checked, then scored, and held when versions go down as deltas."""
        high_round, _ = self.store.high_water()
        problem = self.model_problem(model)
        if problem is not None:
            self.refuse("model", model.version, high_round, problem)
            return
        if self.rollback(model.version, None, self.topics.model_current):
            return
        self.store.raise_high_water(high_round, model.version)
        if model.downlink_codec is None:
            self.evaluate(model)
            return
        self.hold(model)
        self.held_whole = True
        try:  # held: from now on the changes are enough
            self.link.unsubscribe(self.topics.model_current)
            self.whole_models = False
        except MqttError as exc:  # the broker may still send whole models: tried again with the next one
            log.warning("still reading %s (%s)", self.topics.model_current, exc)
        log.info("holding global version %d; following its changes on %s", model.version,
                 self.topics.model_delta_filter)
        self.catch_up()
        if self.held is not None:
            self.evaluate(self.held)

    # --- the global model as deltas (codec/downlink.py) ---------------------------------------------
    @staticmethod
    def unresolved(task: RoundTask) -> bool:
        """Does `task` name its model by digest only (a fleet whose versions go down as deltas)?"""
        return task.model.downlink_codec is not None and not task.model.params

    def _load_held(self) -> GlobalModel | None:
        payload = self.store.held_model()
        if payload is None:
            return None
        try:
            return decode_global(decode_envelope(payload))
        except (EnvelopeError, FleetMessageError) as exc:  # a store written by a broken build: start afresh
            log.error("the held global model cannot be read (%s); reading the whole model again", exc)
            return None

    def hold(self, model: GlobalModel) -> None:
        self.store.hold_model(model.version, encode_global(model))
        self.held = model
        self.behind_since = None
        self.deltas = {v: f for v, f in self.deltas.items() if v > model.version}

    def subscribe_whole_models(self, why: str, level: int = logging.INFO) -> None:
        """Read model/current (its retained message comes at once): to start, to resync (`level` WARNING when
        that means something went wrong), or for good in a fleet that sends whole models."""
        if self.whole_models:
            return
        log.log(level, "reading the whole global model from %s: %s", self.topics.model_current, why)
        self.whole_models = True
        self.link.subscribe(self.topics.model_current, qos=1)

    def on_delta(self, version: int, frame: bytes) -> None:
        if self.held is not None and version <= self.held.version:
            return  # a retained change this device applied already
        if len(self.deltas) < MAX_BUFFERED_DELTAS or version in self.deltas:
            self.deltas[version] = frame
        self.catch_up()

    def catch_up(self) -> None:
        """Apply the changes that follow the held version, in order; score the version reached."""
        held = self.held
        if held is None:
            return
        start = held.version
        while (frame := self.deltas.pop(held.version + 1, None)) is not None:
            try:
                version, params = apply_delta(held.params, held.version, frame,
                                              max_bytes=self.cfg.broker.max_payload_bytes)
            except (EnvelopeError, DownlinkError) as exc:
                self.refuse("model", held.version + 1, self.store.high_water()[0], f"the change to version "
                            f"{held.version + 1}: {exc}")
                self.subscribe_whole_models("a change could not be applied", logging.WARNING)
                return
            new = replace(held, version=version, params=params)
            problem = self.model_problem(new)
            if problem is not None:  # the same model would come whole: keep the last good one, no resync
                self.refuse("model", version, self.store.high_water()[0], problem)
                self.deltas.clear()
                return
            self.hold(new)
            self.held_whole = False
            held = new
        if held.version > start:
            log.info("global version %d rebuilt from version %d and %d change(s)", held.version, start,
                     held.version - start)
            self.evaluate(held)

    def resolve(self, task: RoundTask) -> RoundTask | None:
        """`task` with the tensors of the model it names, once this device holds exactly that model; None while
        it does not (the changes are on their way, or the whole model is: see DELTA_WAIT_S)."""
        if task.model_digest in self.refused_digests:
            return None
        self.catch_up()
        held, version = self.held, task.model.version
        if held is not None and held.version == version:
            digest = model_digest(held.params)
            if digest == task.model_digest:
                self.behind_since = None
                return replace(task, model=task.model.with_params(held.params))
            if self.held_whole:  # not even the whole model is the one the task names: reading it again won't help
                assert task.model_digest is not None
                self.refused_digests.append(task.model_digest)
                self.refuse("task", version, task.round, f"it names model digest {task.model_digest}, but version "
                            f"{version} on {self.topics.model_current} has digest {digest}")
                return None
            self.subscribe_whole_models(f"the held version {version} is not the aggregator's (digest "
                                        f"{digest}, the task says {task.model_digest})",
                                        logging.WARNING)
        elif held is None:
            self.subscribe_whole_models("this device holds no global model yet")
        elif version - held.version > task.downlink_keep:
            self.subscribe_whole_models(f"the held version {held.version} is {version - held.version} behind, "
                                        f"more than the {task.downlink_keep} whose changes are kept")
        elif version > held.version:
            now = self.timer()
            if self.behind_since is None:
                self.behind_since = now
            elif now - self.behind_since > DELTA_WAIT_S:
                self.subscribe_whole_models(f"the changes from version {held.version} to {version} did not arrive "
                                            f"within {DELTA_WAIT_S:g} s", logging.WARNING)
        return None

    def signed_by_fleet(self, msg: Message) -> bool:
        """Is a task or model signed by a fleet key this device trusts (or may it be unsigned)? Logs a refusal."""
        if not self.fleet_keys:
            return True
        # a change of the model (model/delta/<version>) is signed like the whole model
        verdict = verify(msg.payload, self.fleet_keys,
                         self.contexts.get(msg.topic, self.contexts[self.topics.model_current]))
        if verdict.ok or (verdict.refusal is Refusal.UNSIGNED and not self.require_signatures):
            return True
        if verdict.refusal is Refusal.MALFORMED:
            return True  # decode_envelope says what is wrong with it
        kind = "round task" if msg.topic == self.topics.round_current else "global model"
        log.error("refused a %s on %s: %s (%s); training goes on with the genuine ones", kind, msg.topic,
                  "unsigned" if verdict.refusal is Refusal.UNSIGNED else "not signed by the fleet key",
                  verdict.detail)
        return False

    def start(self, timeout: float | None = None) -> None:
        """Connect (within `timeout`, default [broker] connect_timeout_s) and subscribe; messages then arrive in
        `self.link.inbox`."""
        self.link.connect(timeout=self.cfg.broker.connect_timeout_s if timeout is None else timeout)
        self.link.subscribe(self.topics.round_current, qos=1)
        self.link.subscribe(self.topics.model_delta_filter, qos=1)
        if self.held is None:  # a device that holds a model follows the deltas and reads the whole one on demand
            self.subscribe_whole_models("this device holds no global model yet")
        self.link.subscribe(self.topics.receipt(self.cfg.device_id), qos=1)
        log.info("agent %s up: data from %s, fleet %s", self.cfg.device_id, self.source.description, self.cfg.fleet)

    def idle(self) -> None:
        """Nothing arrived for a while: retry what waits for data, then send what is due from the outbox."""
        if self.waiting is not None and self.unresolved(self.waiting):
            resolved = self.resolve(self.waiting)
            if resolved is not None:
                self.waiting = None
                self.accept_task(resolved)
        elif self.waiting is not None:
            self.train(self.waiting)
        self.give_up(self.store.forget_expired(self.clock()), "its round's deadline passed")
        if self.link.connected:
            self.send_due()

    def shutdown(self) -> None:
        try:
            self.link.publish(self.topics.presence(self.cfg.device_id), b"offline", qos=1, retain=True, timeout=2.0)
        except MqttError:
            pass
        self.link.close()
        self.source.close()
        self.store.close()

    def step(self, msg: Message | ConnectionEvent | None) -> None:
        """Handle one message (None: nothing arrived). The boundary: whatever a message makes the code raise
        is logged and counted, and the agent goes on with its last good state. Local faults (SQLite, the file
        system) still end the process: they are not the network's doing, and a supervisor's restart may fix them."""
        try:
            if msg is None:
                self.idle()
            else:
                self.handle(msg)
        except (sqlite3.Error, OSError):
            # A local fault (disk full, a broken store): not the network's doing. Exit with it, so the supervisor
            # restarts the agent with backoff and the operator sees the failure, rather than logging it forever.
            raise
        except Exception:  # see the docstring: never a crash loop on what the network sent
            self.refusals["error"] += 1
            what = "while idle" if msg is None else f"handling {getattr(msg, 'topic', 'a connection event')}"
            log.exception("error %s (%d so far); the agent keeps running with its last good state", what,
                          self.refusals["error"])

    def run(self, stop: threading.Event) -> None:
        self.start()
        while not stop.is_set():
            try:
                msg: Message | ConnectionEvent | None = self.link.inbox.get(timeout=1.0)
            except queue.Empty:
                msg = None
            self.step(msg)
        self.shutdown()
