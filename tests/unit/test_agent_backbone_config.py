"""`[backbone]` in an agent config: which model, which TFLite runtime and how many threads the agent's
backbone runs with, type-checked like every other key; and `[data] max_windows`, the cap on the
embeddings a device keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.agent.sources import open_backbone
from edge_agent.backbone import BackboneError
from edge_agent.config import AgentConfig, BackboneConfig, ConfigError, load_toml, parse_set

from ..conftest import MODEL

AGENT = 'device_id = "pi-1"\nstate_dir = "/tmp/x"\n'


def load(tmp_path: Path, text: str, *overrides: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT + text)
    return load_toml(path, AgentConfig, [parse_set(o) for o in overrides])


def test_the_backbone_table_and_its_defaults(tmp_path: Path) -> None:
    assert load(tmp_path, "").backbone == BackboneConfig(model=None, runtime="auto", num_threads=1)
    cfg = load(tmp_path, f'[backbone]\nmodel = "{MODEL}"\nruntime = "litert"\nnum_threads = 2\n')
    assert cfg.backbone == BackboneConfig(str(MODEL), "litert", 2)
    # `backbone = "PATH"` (the key before the table had other keys) still names the model.
    assert load(tmp_path, f'backbone = "{MODEL}"\n').backbone == BackboneConfig(model=str(MODEL))
    assert load(tmp_path, "", "backbone.runtime=tflite-runtime").backbone.runtime == "tflite-runtime"


@pytest.mark.parametrize("text, problem", [
    ('[backbone]\nruntime = "tflite"\n', "[backbone]: runtime must be one of 'auto', 'litert', 'ai-edge-litert', "
                                         "'tflite-runtime', got 'tflite'"),
    ('[backbone]\nnum_threads = "2"\n', "[backbone]: num_threads must be an integer, got '2' (str)"),
    ('[backbone]\nnum_threads = 0\n', "[backbone]: num_threads must be between 1 and 64, got 0"),
    ('[backbone]\nthreads = 2\n', "[backbone]: unknown key 'threads'"),
    ("backbone = 3\n", "[backbone] must be a table, got 3"),
    ("[data]\nmax_windows = 0\n", "[data]: max_windows must be at least 1, got 0"),
    ("[data]\nmin_windows = 50\nmax_windows = 40\n", "max_windows (40) must be at least min_windows (50)"),
])
def test_wrong_backbone_and_cap_values_are_named(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert any(problem in p and str(tmp_path / "agent.toml") in p for p in err.value.problems), err.value.problems


def test_the_configured_runtime_and_threads_reach_the_backbone() -> None:
    cfg = AgentConfig("pi-1", "/tmp/x", backbone=BackboneConfig(str(MODEL), "litert", 2))
    backbone = open_backbone(cfg)
    assert (backbone.runtime, backbone.num_threads, backbone.path) == ("ai-edge-litert", 2, MODEL)
    try:
        import tflite_runtime.interpreter  # noqa: F401
    except Exception:  # not installed here (numpy 2 + LiteRT): asking for it must say so, not fall back
        with pytest.raises(BackboneError, match="tflite-runtime"):
            open_backbone(AgentConfig("pi-1", "/tmp/x", backbone=BackboneConfig(runtime="tflite-runtime")))
    else:
        assert open_backbone(AgentConfig("pi-1", "/tmp/x", backbone=BackboneConfig(runtime="tflite-runtime"))
                             ).runtime == "tflite-runtime"
