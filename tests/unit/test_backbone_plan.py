"""The backbone runner picks a batch size and op resolver that work here, by probing in a child process.

The crash observed on armv7l (SIGSEGV in invoke at batch > 1 with the default kernels) cannot happen on
x86_64; `EDGE_FL_PROBE_CRASH` makes the probe child really kill itself with SIGSEGV for the named
settings, so the fallback path runs for real: real child processes, real model, real interpreter.
"""

import json

import numpy as np
import pytest

from edge_agent import backbone_plan
from edge_agent.backbone import BackboneError, FrozenBackbone
from edge_agent.backbone_plan import CRASH_ENV, PlanKey

from ..conftest import MODEL


@pytest.fixture(autouse=True)
def fresh_process_memory(monkeypatch):  # type: ignore[no-untyped-def]
    # Each test starts like a new process: nothing remembered in memory, only what is on disk.
    monkeypatch.setattr(backbone_plan, "_remembered", {})
    monkeypatch.delenv(CRASH_ENV, raising=False)


@pytest.fixture(scope="module")
def sample(windows):  # type: ignore[no-untyped-def]
    train, _ = windows
    return train.x[:100]


def test_a_crash_at_batch_size_falls_back_to_the_reference_kernels(tmp_path, monkeypatch, sample, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(CRASH_ENV, "default@64")  # what armv7l did with tflite-runtime 2.14
    with caplog.at_level("INFO", logger="edge_fl.backbone"):
        bb = FrozenBackbone(MODEL, plan_dir=tmp_path)
    assert (bb.batch_size, bb.reference_kernels, bb.plan.source) == (64, True, "probed")
    assert bb.plan.tried == ("default@64: crashed (SIGSEGV)", "reference@64: ok")
    assert any(r.levelname == "WARNING" and "batch 64, reference kernels" in r.getMessage() for r in caplog.records)
    expected = FrozenBackbone(MODEL, batch_size=64, reference_kernels=True).embed(sample)
    np.testing.assert_array_equal(bb.embed(sample), expected)


def test_when_every_batched_run_crashes_it_runs_one_window_at_a_time(tmp_path, monkeypatch, sample) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(CRASH_ENV, "*@64")
    bb = FrozenBackbone(MODEL, plan_dir=tmp_path)
    assert (bb.batch_size, bb.reference_kernels) == (1, False)
    assert [t.split(":")[0] for t in bb.plan.tried] == ["default@64", "reference@64", "default@1"]
    np.testing.assert_array_equal(bb.embed(sample), FrozenBackbone(MODEL, batch_size=1, reference_kernels=False)
                                  .embed(sample))


def test_the_verdict_is_remembered_on_disk_and_not_probed_again(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(CRASH_ENV, "default@64")
    first = FrozenBackbone(MODEL, plan_dir=tmp_path)
    (verdict,) = tmp_path.glob("*.json")
    doc = json.loads(verdict.read_text())
    assert doc["key"]["model_sha256"] == first.sha256 and doc["key"]["runtime"] == first.runtime
    assert doc["key"]["runtime_version"] == first.runtime_version and doc["reference_kernels"] is True
    # A new process: any probe would now crash every setting, so only the remembered verdict can answer.
    monkeypatch.setattr(backbone_plan, "_remembered", {})
    monkeypatch.setenv(CRASH_ENV, "*")
    again = FrozenBackbone(MODEL, plan_dir=tmp_path)
    assert (again.batch_size, again.reference_kernels, again.plan.source) == (64, True, "remembered")


def test_nothing_works_is_one_clear_error_listing_what_was_tried(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(CRASH_ENV, "*")
    with pytest.raises(BackboneError, match=r"every runner setting tried.*default@64: crashed \(SIGSEGV\).*"
                                            r"reference@1: crashed \(SIGSEGV\).*--runtime"):
        FrozenBackbone(MODEL, plan_dir=tmp_path)
    assert not list(tmp_path.glob("*.json"))  # no verdict for a failure: a fixed install probes again


def test_explicit_settings_win_over_the_probe(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(CRASH_ENV, "*")  # a probe would fail: none may run
    bb = FrozenBackbone(MODEL, batch_size=64, reference_kernels=False, plan_dir=tmp_path)
    assert (bb.batch_size, bb.reference_kernels, bb.plan.source) == (64, False, "explicit")
    assert not list(tmp_path.glob("*.json"))
    # Only the resolver given: the probe varies the batch size and keeps the resolver.
    monkeypatch.setenv(CRASH_ENV, "reference@64")
    bb = FrozenBackbone(MODEL, reference_kernels=True, plan_dir=tmp_path)
    assert (bb.batch_size, bb.reference_kernels) == (1, True)
    # Only the batch size given: the probe varies the resolver and keeps the batch size.
    monkeypatch.setenv(CRASH_ENV, "default@*")
    bb = FrozenBackbone(MODEL, batch_size=16, plan_dir=tmp_path)
    assert (bb.batch_size, bb.reference_kernels) == (16, True)


def test_an_unusable_verdict_or_cache_directory_only_costs_a_probe(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    FrozenBackbone(MODEL, plan_dir=tmp_path)
    (verdict,) = tmp_path.glob("*.json")
    verdict.write_text("{torn")
    backbone_plan._remembered.clear()
    with caplog.at_level("WARNING", logger="edge_fl.backbone"):
        assert FrozenBackbone(MODEL, plan_dir=tmp_path).plan.source == "probed"
    assert "ignoring unreadable backbone runner verdict" in caplog.text
    (tmp_path / "file").write_text("")
    backbone_plan._remembered.clear()
    with caplog.at_level("WARNING", logger="edge_fl.backbone"):
        bb = FrozenBackbone(MODEL, plan_dir=tmp_path / "file" / "sub")  # cannot be created
    assert bb.plan.source == "probed" and "cannot remember the backbone runner verdict" in caplog.text


def test_a_verdict_belongs_to_one_model_runtime_version_and_machine() -> None:
    key = PlanKey("ab" * 32, "tflite-runtime", "2.14.0", "armv7l", 1, None, None)
    others = [PlanKey("cd" * 32, "tflite-runtime", "2.14.0", "armv7l", 1, None, None),
              PlanKey("ab" * 32, "ai-edge-litert", "2.14.0", "armv7l", 1, None, None),
              PlanKey("ab" * 32, "tflite-runtime", "2.15.0", "armv7l", 1, None, None),
              PlanKey("ab" * 32, "tflite-runtime", "2.14.0", "aarch64", 1, None, None),
              PlanKey("ab" * 32, "tflite-runtime", "2.14.0", "armv7l", 4, None, None),
              PlanKey("ab" * 32, "tflite-runtime", "2.14.0", "armv7l", 1, 32, None)]
    assert len({key.digest(), *(k.digest() for k in others)}) == 1 + len(others)
