"""codec.signing (pure) and keys (files, registry): every refusal named, any flipped bit refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.codec.compression import CodecSpec
from edge_agent.codec.envelope import (
    FLAG_SIGNED,
    SIGNATURE_SIZE,
    Envelope,
    EnvelopeError,
    Kind,
    decode_envelope,
    encode_envelope,
)
from edge_agent.codec.signing import Purpose, Refusal, context, signer, verify
from edge_agent.codec.update_frame import (
    UpdateFrame,
    decode_update_frame,
    encode_update_frame,
    frame_seeds,
    is_update_frame,
)
from edge_agent.keys import (
    KeyFileError,
    KeyRegistry,
    load_private_key,
    load_public_keys,
    new_private_key,
    public_pem,
    register,
    revoke,
    write_private_key,
)

KEY = new_private_key()
OTHER = new_private_key()
CTX = context(Purpose.UPDATE, "f1")


def _update(device: str = "dev-1", round_no: int = 3) -> Envelope:
    return Envelope(kind=Kind.UPDATE, device_id=device, round=round_no, model_version=2, strategy="fedavg",
                    update_id="u1", num_examples=10, codec="float32",
                    tensors={"w": np.arange(6, dtype=np.float32).reshape(2, 3)})


SIGNED = encode_envelope(_update(), sign=signer(KEY, CTX))


def test_a_signed_envelope_verifies_and_decodes_to_the_same_update() -> None:
    unsigned = encode_envelope(_update())
    assert len(SIGNED) == len(unsigned) + SIGNATURE_SIZE  # the whole cost in bytes: one 64-byte trailer
    assert SIGNED[14] & FLAG_SIGNED and not unsigned[14] & FLAG_SIGNED
    verdict = verify(SIGNED, [KEY.public_key()], CTX)
    assert verdict.ok and verdict.key_index == 0
    env = decode_envelope(SIGNED)
    assert (env.device_id, env.round, env.update_id) == ("dev-1", 3, "u1")
    np.testing.assert_array_equal(env.tensors["w"], _update().tensors["w"])


def test_each_refusal_is_named() -> None:
    pub = KEY.public_key()
    assert verify(encode_envelope(_update()), [pub], CTX).refusal is Refusal.UNSIGNED
    assert verify(SIGNED, [], CTX).refusal is Refusal.UNKNOWN_SIGNER
    assert verify(SIGNED, [OTHER.public_key()], CTX).refusal is Refusal.WRONG_KEY  # intact, another signer
    assert verify(b"garbage", [pub], CTX).refusal is Refusal.MALFORMED
    tampered = bytearray(SIGNED)
    tampered[60] ^= 1
    assert verify(bytes(tampered), [pub], CTX).refusal is Refusal.TAMPERED


def test_a_signature_does_not_move_between_purposes_or_fleets() -> None:
    pub = [KEY.public_key()]
    assert verify(SIGNED, pub, context(Purpose.MODEL, "f1")).refusal is Refusal.WRONG_KEY
    assert verify(SIGNED, pub, context(Purpose.UPDATE, "f2")).refusal is Refusal.WRONG_KEY


def test_rotation_accepts_either_fleet_key_and_says_which() -> None:
    assert verify(SIGNED, [OTHER.public_key(), KEY.public_key()], CTX).key_index == 1


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_bit_fails_verification(data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(SIGNED) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    flipped = bytearray(SIGNED)
    flipped[i] ^= 1 << bit
    assert not verify(bytes(flipped), [KEY.public_key()], CTX).ok


# --- the compact update frame: the same signatures, the same verdicts ---------------------------------------------

FRAME_SHAPES = {"w": (2, 3), "b": (3,)}
FRAME_SEEDS = frame_seeds("dev-1")


def _frame_update() -> UpdateFrame:
    return UpdateFrame(device_id="dev-1", round=3, model_version=2, strategy="fedavg", update_id="ab" * 16,
                       num_examples=10, codec=CodecSpec.parse("int8"),
                       tensors={"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)})


SIGNED_FRAME = encode_update_frame(_frame_update(), FRAME_SHAPES, FRAME_SEEDS, sign=signer(KEY, CTX))


def test_a_signed_frame_verifies_and_decodes_to_the_same_update() -> None:
    unsigned = encode_update_frame(_frame_update(), FRAME_SHAPES, FRAME_SEEDS)
    assert len(SIGNED_FRAME) == len(unsigned) + SIGNATURE_SIZE
    assert SIGNED_FRAME[3] == 1 and unsigned[3] == 0
    assert SIGNED_FRAME[52:-SIGNATURE_SIZE] == unsigned[52:]  # same body; the header differs by the flag
    verdict = verify(SIGNED_FRAME, [KEY.public_key()], CTX)
    assert verdict.ok and verdict.key_index == 0
    back = decode_update_frame(SIGNED_FRAME, device_id="dev-1", strategy="fedavg", shapes=FRAME_SHAPES,
                               seed_of=FRAME_SEEDS)
    plain = decode_update_frame(unsigned, device_id="dev-1", strategy="fedavg", shapes=FRAME_SHAPES,
                                seed_of=FRAME_SEEDS)
    assert (back.round, back.update_id) == (3, "ab" * 16)
    for name in FRAME_SHAPES:
        np.testing.assert_array_equal(back.tensors[name], plain.tensors[name])


def test_each_refusal_is_named_for_frames_too() -> None:
    pub = KEY.public_key()
    unsigned = encode_update_frame(_frame_update(), FRAME_SHAPES, FRAME_SEEDS)
    verdict = verify(unsigned, [pub], CTX)
    assert verdict.refusal is Refusal.UNSIGNED and "update frame" in verdict.detail
    assert verify(SIGNED_FRAME, [], CTX).refusal is Refusal.UNKNOWN_SIGNER
    assert verify(SIGNED_FRAME, [OTHER.public_key()], CTX).refusal is Refusal.WRONG_KEY
    assert verify(SIGNED_FRAME, [pub], context(Purpose.UPDATE, "f2")).refusal is Refusal.WRONG_KEY
    for offset in (8, 40, 60, len(SIGNED_FRAME) - 1):  # round, digest, body, signature
        tampered = bytearray(SIGNED_FRAME)
        tampered[offset] ^= 1
        expected = Refusal.WRONG_KEY if offset >= len(SIGNED_FRAME) - SIGNATURE_SIZE else Refusal.TAMPERED
        assert verify(bytes(tampered), [pub], CTX).refusal is expected  # a bad signature on intact bytes
    for malformed in (b"EU", SIGNED_FRAME[:52], SIGNED_FRAME[:2] + b"\x01\x04" + SIGNED_FRAME[4:],
                      SIGNED_FRAME[:52 + SIGNATURE_SIZE - 1]):
        assert verify(malformed, [pub], CTX).refusal is Refusal.MALFORMED
    assert verify(SIGNED_FRAME[:52 + SIGNATURE_SIZE], [pub], CTX).refusal is Refusal.TAMPERED


def test_stripping_a_frames_signature_leaves_an_unsigned_frame_the_digest_refuses() -> None:
    stripped = SIGNED_FRAME[:3] + b"\x00" + SIGNED_FRAME[4:-SIGNATURE_SIZE]
    assert verify(stripped, [KEY.public_key()], CTX).refusal is Refusal.UNSIGNED
    with pytest.raises(EnvelopeError, match="corrupted"):  # the flag is covered by the digest
        decode_update_frame(stripped, device_id="dev-1", strategy="fedavg", shapes=FRAME_SHAPES,
                            seed_of=FRAME_SEEDS)


def test_envelope_verdicts_are_unchanged_by_frames() -> None:
    assert not is_update_frame(SIGNED)
    assert verify(encode_envelope(_update()), [KEY.public_key()], CTX).detail == "the envelope carries no signature"
    assert verify(b"garbage", [KEY.public_key()], CTX).detail == (
        "envelope truncated: 7 bytes, expected at least 48")


def test_verifying_envelopes_does_not_load_the_frame_codecs() -> None:
    # the lossy codecs import hashlib, whose OpenSSL costs a device about 3.5 MB: not for envelope-only traffic
    code = ("import sys\n"
            "from edge_agent.codec.signing import verify\n"
            "from edge_agent.codec.envelope import Envelope, Kind, encode_envelope\n"
            "import numpy as np\n"
            "env = Envelope(Kind.UPDATE, 'd', 1, 0, 's', 'u', 1, {'b': np.zeros(2, np.float32)})\n"
            "verify(encode_envelope(env), [], b'')\n"
            "print('edge_agent.codec.update_frame' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_bit_of_a_frame_fails_verification(data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(SIGNED_FRAME) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    flipped = bytearray(SIGNED_FRAME)
    flipped[i] ^= 1 << bit
    assert not verify(bytes(flipped), [KEY.public_key()], CTX).ok


def test_private_key_file_is_owner_only_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    write_private_key(KEY, path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert public_pem(load_private_key(path).public_key()) == public_pem(KEY.public_key())
    with pytest.raises(KeyFileError, match="already exists"):
        write_private_key(OTHER, path)
    with pytest.raises(KeyFileError, match="not found"):
        load_private_key(tmp_path / "missing.key")
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        load_private_key(tmp_path / "junk.key")


def test_registry_rotation_and_revocation_take_effect_without_a_restart(tmp_path: Path) -> None:
    now = [0.0]
    reg_dir = tmp_path / "devices"
    reg_dir.mkdir()
    registry = KeyRegistry(reg_dir, clock=lambda: now[0])
    assert registry.keys_for("dev-1") == ()
    register(reg_dir, "dev-1", public_pem(KEY.public_key()))
    now[0] += 1.5  # the directory is looked at once a second
    assert registry.refresh()
    assert [public_pem(k) for k in registry.keys_for("dev-1")] == [public_pem(KEY.public_key())]
    # rotation, step 1: the new key beside the old one; both verify
    register(reg_dir, "dev-1", public_pem(OTHER.public_key()), keep_old=True)
    registry.request_reload()  # what SIGHUP does: no need to wait for the next look
    assert registry.refresh()
    assert len(registry.keys_for("dev-1")) == 2
    # rotation, step 2: the new key alone; the old one no longer verifies
    register(reg_dir, "dev-1", public_pem(OTHER.public_key()))
    registry.request_reload()
    registry.refresh()
    assert verify(SIGNED, registry.keys_for("dev-1"), CTX).refusal is Refusal.WRONG_KEY
    # revocation: the file moves to revoked/, the device is unknown from then on
    moved = revoke(reg_dir, "dev-1")
    assert moved.parent.name == "revoked" and load_public_keys(moved)
    registry.request_reload()
    registry.refresh()
    assert verify(SIGNED, registry.keys_for("dev-1"), CTX).refusal is Refusal.UNKNOWN_SIGNER
    with pytest.raises(KeyFileError, match="not enrolled"):
        revoke(reg_dir, "dev-1")


def test_a_bad_registry_file_is_skipped_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "dev-1.pub").write_text("junk")
    register(tmp_path, "dev-2", public_pem(KEY.public_key()))
    registry = KeyRegistry(tmp_path)
    assert registry.keys_for("dev-1") == () and len(registry.keys_for("dev-2")) == 1
    with pytest.raises(KeyFileError, match="not a directory"):
        KeyRegistry(tmp_path / "missing")


def test_the_highest_accepted_round_and_version_survive_a_restart(tmp_path: Path) -> None:
    from edge_agent.agent.store import AgentStore

    store = AgentStore(tmp_path / "agent.db")
    assert store.high_water() == (0, 0)
    store.raise_high_water(3, 2)
    store.raise_high_water(2, 5)  # each only ever goes up
    store.close()
    reopened = AgentStore(tmp_path / "agent.db")
    assert reopened.high_water() == (3, 5)
    reopened.close()


def test_signing_config_needs_both_halves(tmp_path: Path) -> None:
    from edge_agent.config import AgentConfig, AggregatorConfig, ConfigError, load_toml

    agent = tmp_path / "agent.toml"
    agent.write_text('device_id = "d1"\nstate_dir = "/tmp/x"\n[signing]\nkey = "/etc/edge-fl/device.key"\n')
    with pytest.raises(ConfigError, match="key and fleet_keys go together"):
        load_toml(agent, AgentConfig)
    agg = tmp_path / "aggregator.toml"
    agg.write_text('state = "/tmp/a.db"\n[signing]\nkey = "/k"\nregistry = "/r"\nrequired = false\n')
    cfg = load_toml(agg, AggregatorConfig)
    assert (cfg.signing.key, cfg.signing.registry, cfg.signing.required) == ("/k", "/r", False)
