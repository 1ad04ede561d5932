"""learning/validate.py: the one check of a head's tensors that the aggregator and every device make."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.agent.service import AgentService
from edge_agent.fleet import GlobalModel
from edge_agent.learning.head import HeadConfig, init_params
from edge_agent.learning.strategies import ClientState, ClientUpdate, make_strategy
from edge_agent.learning.training import TrainingConfig
from edge_agent.learning.validate import (
    DEFAULT_MAX_ABS,
    HARD_MAX_ABS,
    MAX_HEAD_WEIGHTS,
    InvalidHeadError,
    check_head_config,
    check_head_params,
    effective_bound,
    expected_shapes,
    head_problem,
)

HEAD = HeadConfig(in_dim=8, num_classes=3, adapter_dim=4)


def _params() -> dict[str, np.ndarray]:
    return init_params(HEAD, np.random.default_rng(0))


def test_a_fresh_head_passes_for_every_strategy() -> None:
    for name in ("fedavg", "fedper", "lg-fedavg", "ditto", "ncm", "local"):
        strategy = make_strategy(name, HEAD)
        server = strategy.init_server(np.random.default_rng(0))
        check_head_params(server.params, expected_shapes(HEAD, strategy.shared_keys))


@pytest.mark.parametrize(("poison", "words"), [
    (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-np.inf, "NaN or infinite"),
    (1e30, "beyond the bound"), (DEFAULT_MAX_ABS * 1.5, "beyond the bound")])
def test_non_finite_or_huge_values_are_refused_and_named(poison: float, words: str) -> None:
    params = _params()
    params["classifier.b"] = params["classifier.b"].copy()
    params["classifier.b"][1] = poison
    problem = head_problem(params, HEAD.shapes, what="global model version 7")
    assert problem is not None and words in problem and "classifier.b" in problem and "version 7" in problem


def test_wrong_names_or_shapes_are_refused() -> None:
    params = _params()
    assert "missing ['adapter.b']" in str(head_problem({k: v for k, v in params.items() if k != "adapter.b"},
                                                       HEAD.shapes))
    assert "unexpected ['evil']" in str(head_problem({**params, "evil": np.zeros(1)}, HEAD.shapes))
    with pytest.raises(InvalidHeadError, match=r"classifier.w has shape \(3, 4\), expected \(4, 3\)"):
        check_head_params({**params, "classifier.w": np.zeros((3, 4), np.float32)}, HEAD.shapes)
    with pytest.raises(InvalidHeadError, match="expected numbers"):
        check_head_params({"x": np.array(["a"])}, None)


def test_the_announced_bound_is_honoured_but_capped() -> None:
    assert effective_bound(None) == DEFAULT_MAX_ABS
    assert effective_bound(float("nan")) == effective_bound(-1.0) == DEFAULT_MAX_ABS
    assert effective_bound(10.0) == 10.0
    assert effective_bound(1e300) == HARD_MAX_ABS  # an insider cannot announce a bound that lets 1e30 through
    params = _params()
    assert head_problem(params, HEAD.shapes, max_abs=1e-6) is not None


def test_head_configs_a_device_must_not_build() -> None:
    check_head_config(HEAD)
    with pytest.raises(InvalidHeadError, match="positive sizes"):
        check_head_config(HeadConfig(0, 3, 4))
    with pytest.raises(InvalidHeadError, match=f"at most {MAX_HEAD_WEIGHTS}"):
        check_head_config(HeadConfig(1 << 20, 3, 1 << 10))


def test_a_diverged_training_result_is_caught() -> None:
    model = GlobalModel(3, TrainingConfig(strategy="ncm"), HEAD, {})
    ok_state = ClientState({"classifier.w": np.ones((4, 3), np.float32)})
    stats = {"ncm.class_sum": np.full((3, 4), 1e7, np.float32), "ncm.class_count": np.ones(3, np.float32)}
    keys = frozenset(stats) | frozenset(HEAD.keys)
    # class sums grow with the data: finite is all they must be
    assert AgentService.training_problem(model, ok_state, ClientUpdate(stats, 10, keys)) is None
    nan_stats = {**stats, "ncm.class_sum": np.full((3, 4), np.nan, np.float32)}
    assert "NaN" in str(AgentService.training_problem(model, ok_state, ClientUpdate(nan_stats, 10, keys)))
    huge = ClientUpdate({"classifier.b": np.full(3, 1e20, np.float32)}, 10, keys)
    assert "the update" in str(AgentService.training_problem(model, ok_state, huge))
    bad_state = ClientState({"classifier.w": np.full((4, 3), np.inf, np.float32)})
    assert "personal head" in str(AgentService.training_problem(model, bad_state, None))
