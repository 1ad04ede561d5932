"""`edge-fl demo` end to end: a private broker (or a given one), the aggregator and agent processes.

Besides the numbers (the same as `edge-fl simulate`'s), the demo is held to how it ends: SIGTERM, SIGHUP and
even SIGKILL leave no process behind, no password reaches a file, and logs stay only when something went wrong.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.broker import BrokerError, LocalBroker, find_mosquitto
from edge_agent.data.federated import federate
from edge_agent.data.partition import PartitionConfig
from edge_agent.learning.training import TrainingConfig
from edge_agent.sim import run_simulation

from ..conftest import ROOT

pytestmark = pytest.mark.fleet
DEMO = [sys.executable, "-m", "edge_agent.cli", "demo"]


def _cmdline(pid: str) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = _cmdline(pid)
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def _still_running(pids: set[int]) -> list[str]:
    """Live processes of the demo: one of `pids`, or in a session or process group one of them leads.

    Zombies do not count (they have exited); a pid the kernel gave to some unrelated process since does
    not either (its command line names neither edge_agent nor mosquitto).
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = _cmdline(entry)
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces, so split after its last ')'
        state, _ppid, pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
        ours = int(entry) in pids or int(pgrp) in pids or int(session) in pids
        if ours and state != "Z" and ("edge_agent" in cmd or "mosquitto" in cmd):
            found.append(f"{entry}: {cmd}")
    return found


class DemoProcess:
    """`edge-fl demo ...` in the background; its stdout lines arrive in a queue as they are printed."""

    def __init__(self, args: list[str], tmp: Path) -> None:
        (tmp / "tmp").mkdir(exist_ok=True)
        # TMPDIR: the demo's temporary directories (work and secrets) land where the test can see them.
        env = {**os.environ, "TMPDIR": str(tmp / "tmp"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([*DEMO, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [threading.Thread(target=self._read_stdout, daemon=True),
                        threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr.extend(self.proc.stderr)

    def wait_for_line(self, prefix: str, timeout: float = 120.0) -> str:
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > end:
                code, out, err = self.kill()
                raise AssertionError(f"no line starting {prefix!r} (exit code {code}); stdout:\n{out}\nstderr:\n{err}")
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once the demo has exited."""
        code = self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(timeout)  # both pipes are at end-of-file once the demo and its children are gone
        return code, "".join(self.stdout), "".join(self.stderr)

    def kill(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.finish()


def _logs_dir(stdout: str) -> Path:
    started = next(line for line in stdout.splitlines() if line.startswith("started the aggregator"))
    return Path(started.rsplit("; logs in ", 1)[1])


@pytest.mark.parametrize("fraction, rounds, own_workdir", [(1.0, 6, True), (0.5, 4, False)])
def test_demo_matches_simulate_and_leaves_nothing_behind(tmp_path: Path, embedded, fraction: float,  # type: ignore[no-untyped-def]
                                                         rounds: int, own_workdir: bool) -> None:
    out, workdir = tmp_path / "demo.json", tmp_path / "work"
    args = ["--strategy", "ditto", "--rounds", str(rounds), "--seed", "1", "--fraction", str(fraction),
            "--local-epochs", "2", "--out", str(out)]
    demo = DemoProcess(args + (["--workdir", str(workdir)] if own_workdir else []), tmp_path)
    code, stdout, stderr = demo.finish(timeout=170)
    assert code == 0, stdout + stderr
    assert "reporting" in stdout and f"   {rounds} " in stdout  # the live table reached the last round
    logs = _logs_dir(stdout)
    # A directory the user named is theirs to keep; the demo's own temporary one goes after a success.
    assert logs.exists() if own_workdir else not logs.exists(), logs
    demo_doc = json.loads(out.read_text())
    sim = run_simulation(federate(embedded, PartitionConfig("natural", seed=1)),
                         TrainingConfig(strategy="ditto", rounds=rounds, seed=1, fraction=fraction, local_epochs=2))
    assert len(demo_doc["rounds"]) == rounds
    # The same devices train in the same rounds (the aggregator's selection in both), and every device's
    # accuracy agrees; only the order in which the real aggregator sums updates can move a last float bit.
    assert [r["clients_reporting"] for r in demo_doc["rounds"]] == [r["clients_reporting"] for r in sim["rounds"]]
    assert all(r["clients_reporting"] == round(6 * fraction) and r["rejected"] == 0 for r in demo_doc["rounds"])
    for d_round, s_round in zip(demo_doc["rounds"], sim["rounds"], strict=True):
        assert set(d_round["client_acc"]) == set(s_round["client_acc"])
        for cid, acc in s_round["client_acc"].items():
            got = d_round["client_acc"][cid]
            assert abs(got - acc) <= 0.01, (d_round["round"], cid, got, acc)
    assert abs(demo_doc["summary"]["mean_acc"] - sim["summary"]["mean_acc"]) <= 0.01
    # What crossed the devices' sockets: the payloads simulate counts, plus MQTT headers, acknowledgements and pings.
    wire, payloads = (demo_doc["summary"]["device_socket_bytes_received_per_client_round"],
                      sim["summary"]["downlink_bytes_per_client_round"])
    assert payloads <= wire <= 2 * payloads, (wire, payloads)
    assert demo_doc["summary"]["device_socket_bytes_sent_per_client_round"] > 0
    assert _processes_mentioning(str(logs)) == []  # no agent, aggregator or broker left running


def _require_mosquitto() -> None:
    try:
        find_mosquitto()
    except BrokerError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))


def test_more_agents_than_subjects_complete_rounds_and_no_password_reaches_a_file(tmp_path: Path) -> None:
    _require_mosquitto()
    password = "pw-" + secrets.token_hex(16)
    out = tmp_path / "demo.json"
    with LocalBroker(tmp_path / "broker", users={"fleet-user": password}) as broker:
        demo = DemoProcess(["--agents", "8", "--rounds", "2", "--broker", f"{broker.host}:{broker.port}",
                            "--username", "fleet-user", "--password", password, "--keep-logs", "--out", str(out)],
                           tmp_path)
        code, stdout, stderr = demo.finish(timeout=170)
    assert code == 0, stdout + stderr
    assert "started the aggregator and 8 agents on the data of 6 subjects" in stdout, stdout
    doc = json.loads(out.read_text())
    devices = {"subject-04", "subject-05", "subject-06", "subject-07", "subject-08", "subject-09",
               "subject-04-2", "subject-05-2"}
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    for r in doc["rounds"]:
        assert set(r["client_acc"]) == devices and r["clients_reporting"] == 8 and r["rejected"] == 0, r
    logs = _logs_dir(stdout)
    assert logs.is_dir() and logs.is_relative_to(tmp_path / "tmp")  # --keep-logs: kept after a success
    # Configs, logs, agent and aggregator state, the results, anything else the demo left in TMPDIR, and
    # what it printed: the password is in none of them (the broker's own work directory holds its hash).
    files = [p for p in (tmp_path / "tmp").rglob("*") if p.is_file()] + [out]
    assert len(files) > 10
    leaks = [str(p) for p in files if password.encode() in p.read_bytes()]
    assert leaks == [] and password not in stdout + stderr, leaks
    assert not list((tmp_path / "tmp").glob("edge-fl-demo-secrets-*"))  # the password files are gone


def _pids_of(logs: Path) -> set[int]:
    pids = json.loads((logs / "pids.json").read_text())
    assert {"broker", "aggregator", "subject-04", "subject-05"} <= set(pids), pids
    return set(pids.values())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_stops_every_process_the_demo_started(tmp_path: Path, sig: signal.Signals) -> None:
    _require_mosquitto()
    demo = DemoProcess(["--agents", "2", "--rounds", "500"], tmp_path)
    try:
        demo.wait_for_line("    1 ")  # the fleet is up and trains: round 1 closed
        logs = _logs_dir("".join(demo.stdout))
        pids = _pids_of(logs)
        demo.proc.send_signal(sig)
        code, stdout, stderr = demo.finish()
    finally:
        demo.kill()
    assert code == 128 + sig, (code, stdout, stderr)
    assert stderr.splitlines()[-1:] == [f"edge-fl: demo stopped by {sig.name}"] and "Traceback" not in stderr, stderr
    # A run that did not finish keeps its logs and says where.
    assert f"logs kept in {logs}\n" in stdout and (logs / "aggregator.log").exists()
    # The demo waited for every child before it exited: nothing to wait for here.
    assert _still_running(pids) == [], "left behind"
    assert _processes_mentioning(str(logs)) == []


def test_a_killed_demo_leaves_no_process_behind(tmp_path: Path) -> None:
    """SIGKILL cannot be caught: the children see their lifeline (stdin) close and stop by themselves."""
    _require_mosquitto()
    demo = DemoProcess(["--agents", "2", "--rounds", "500"], tmp_path)
    try:
        demo.wait_for_line("    1 ")
        logs = _logs_dir("".join(demo.stdout))
        pids = _pids_of(logs)
        demo.proc.kill()
        assert demo.finish()[0] == -signal.SIGKILL
        # They stop on their own, asynchronously: poll with a deadline (their clean stop, or the kill after
        # demo.ORPHAN_GRACE_S).
        end = time.monotonic() + 30.0
        while (left := _still_running(pids)) and time.monotonic() < end:
            time.sleep(0.1)
        assert left == []
        # ...because they noticed, not because something else stopped them.
        assert "the demo that started this process is gone" in (logs / "subject-04.log").read_text()
    finally:
        demo.kill()


def test_demo_with_an_unreachable_broker_fails_with_one_clear_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([*DEMO, "--rounds", "1", "--broker", f"127.0.0.1:{port}", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 1
    # One error line, last (before it, the transport's warning that --broker's logins cross plain TCP).
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and p.stderr.splitlines()[-1] == errors[0], p.stderr
    assert errors[0].startswith("edge-fl: error:") and f"127.0.0.1:{port}" in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    assert f"logs kept in {tmp_path}" in p.stdout


@pytest.mark.parametrize("agents", ["0", "-1", "two"])
def test_demo_refuses_a_wrong_number_of_agents_as_a_usage_error(agents: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--agents", agents])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--agents" in err and "at least 1" in err, err


def test_credentials_without_a_broker_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent.cli import main

    assert main(["demo", "--password", "secret"]) == 2
    err = capsys.readouterr().err
    assert "--broker" in err and "secret" not in err, err


def test_secure_demo_runs_mutual_tls_with_signatures_and_matches_the_plain_one(tmp_path: Path) -> None:
    """The default demo: the production broker config, a certificate per process, signatures required; the
    same accuracies as `--plain` with the same seeds; no private key outside the demo's private pki/ directory."""
    _require_mosquitto()
    from edge_agent.transport import MqttLink, TlsError, TlsOptions

    args = ["--agents", "3", "--rounds", "4", "--seed", "2", "--keep-logs"]
    secure_out, plain_out = tmp_path / "secure.json", tmp_path / "plain.json"
    (tmp_path / "secure").mkdir()
    (tmp_path / "plain").mkdir()
    demo = DemoProcess([*args, "--out", str(secure_out)], tmp_path / "secure")
    try:
        port = int(demo.wait_for_line("broker: ").split(" on ")[1].split()[0].rsplit(":", 1)[1])
        logs = _logs_dir(demo.wait_for_line("started the aggregator"))
        # While the fleet runs: a client with the fleet CA but no certificate of its own gets nowhere.
        link = MqttLink("intruder", "127.0.0.1", port, tls=TlsOptions(str(logs / "pki" / "ca.crt")))
        try:
            with pytest.raises(TlsError) as refused:
                link.connect(timeout=10)
        finally:
            link.close()
        assert refused.value.alert == "certificate required", refused.value
        code, stdout, stderr = demo.finish(timeout=120)
    finally:
        demo.kill()
    assert code == 0, stdout + stderr
    assert "security: mutual TLS" in stdout and "WARNING" not in stdout, stdout
    broker_conf = (logs / "broker" / "mosquitto.conf").read_text().splitlines()
    assert {"require_certificate true", "use_identity_as_username true", "use_username_as_clientid true",
            "allow_anonymous false"} <= set(broker_conf), broker_conf
    # Every process logged in as its certificate's CN (there are no passwords to log in with).
    broker_log = (logs / "broker" / "mosquitto.log").read_text()
    for who in ("aggregator", "demo-monitor", "subject-04", "subject-05", "subject-06"):
        assert f" as {who} (p5, " in broker_log and f"u'{who}'" in broker_log, who
    assert "updates must be signed" in (logs / "aggregator.log").read_text()
    assert "tasks and models must be signed" in (logs / "subject-04.log").read_text()
    # Private keys only in pki/ (mode 0700), each file mode 0600; none in a config, log, result or output.
    pki = logs / "pki"
    assert pki.stat().st_mode & 0o777 == 0o700
    files = [p for p in logs.rglob("*") if p.is_file()] + [secure_out]
    holding = [p for p in files if b"PRIVATE KEY" in p.read_bytes()]
    assert len(holding) >= 2 + 3 + 2 * 3 and all(p.is_relative_to(pki) and p.stat().st_mode & 0o077 == 0
                                                  for p in holding), holding
    assert "PRIVATE KEY" not in stdout + stderr

    plain = DemoProcess([*args, "--plain", "--out", str(plain_out)], tmp_path / "plain")
    code, plain_stdout, plain_stderr = plain.finish(timeout=120)
    assert code == 0, plain_stdout + plain_stderr
    assert "WARNING: plain demo" in plain_stdout and "UNENCRYPTED" in plain_stdout
    secure_doc, plain_doc = json.loads(secure_out.read_text()), json.loads(plain_out.read_text())
    assert secure_doc["config"]["security"] == "mutual TLS, signed"
    assert plain_doc["config"]["security"] == "plain, unsigned"
    assert [r["round"] for r in secure_doc["rounds"]] == [1, 2, 3, 4]
    for s_round, p_round in zip(secure_doc["rounds"], plain_doc["rounds"], strict=True):
        assert s_round["clients_reporting"] == p_round["clients_reporting"] == 3 and s_round["rejected"] == 0
        assert s_round["client_acc"].keys() == p_round["client_acc"].keys()
        for device, acc in p_round["client_acc"].items():
            # The same training; only the order the aggregator sums updates in can move a last float bit.
            assert abs(s_round["client_acc"][device] - acc) <= 1e-6, (s_round["round"], device)
    # Signatures make updates bigger on the wire (64 bytes each plus a flag), nothing else changes.
    assert secure_doc["rounds"][0]["uplink_bytes"] > plain_doc["rounds"][0]["uplink_bytes"]
