import numpy as np
import pytest

from edge_agent.learning.head import (
    ADAPTER_KEYS, CLASSIFIER_KEYS, FitConfig, HeadConfig, OptimizerConfig, PersonalizationHead,
    class_weights, fit, init_params, loss_and_grads,
)


def _problem(seed: int = 0):  # small separable-ish problem in float64 for an exact gradient check
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((12, 5))
    y = rng.integers(0, 3, 12)
    params = {k: v.astype(np.float64) for k, v in init_params(HeadConfig(5, 3, 4), rng).items()}
    params["adapter.b"] = rng.standard_normal(4) * 0.5  # avoid ReLU kinks sitting exactly at zero
    return x, y, params


@pytest.mark.parametrize("extras", [
    {},
    {"weight_decay": 0.1},
    {"sample_weight": np.linspace(0.5, 2.0, 12)},
    {"prox_lambda": 0.7},
])
def test_gradient_matches_finite_differences(extras: dict) -> None:
    x, y, params = _problem()
    if "prox_lambda" in extras:
        extras = {**extras, "prox_center": {k: v + 0.3 for k, v in params.items()}}
    _, grads = loss_and_grads(params, x, y, **extras)
    eps = 1e-6
    for k, p in params.items():
        num = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            orig = p[i]
            p[i] = orig + eps
            lp, _ = loss_and_grads(params, x, y, **extras)
            p[i] = orig - eps
            lm, _ = loss_and_grads(params, x, y, **extras)
            p[i] = orig
            num[i] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(grads[k], num, rtol=1e-3, atol=1e-5, err_msg=k)


def test_loss_is_log_k_for_zero_weights_golden() -> None:
    params = {"classifier.w": np.zeros((4, 5), np.float32), "classifier.b": np.zeros(5, np.float32)}
    loss, _ = loss_and_grads(params, np.ones((3, 4), np.float32), np.array([0, 1, 2]))
    assert loss == pytest.approx(np.log(5), rel=1e-6)


def test_fit_does_not_mutate_input_and_respects_frozen_keys() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    params = init_params(HeadConfig(8, 2, 4), rng)
    before = {k: v.copy() for k, v in params.items()}
    out = fit(params, x, y, FitConfig(epochs=3), rng, trainable=CLASSIFIER_KEYS)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    for k in ADAPTER_KEYS:
        np.testing.assert_array_equal(out[k], before[k])
    assert not np.array_equal(out["classifier.w"], before["classifier.w"])


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_both_optimizers_learn_a_linear_rule(kind: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    head = PersonalizationHead.initial(HeadConfig(6, 2, 8), rng)
    lr = 0.01 if kind == "adam" else 0.05
    trained = head.fit(x, y, FitConfig(epochs=20, optimizer=OptimizerConfig(kind=kind, lr=lr)), rng)
    assert np.mean(trained.predict(x) == y) > 0.95
    assert np.mean(head.predict(x) == y) < 0.9


def test_class_weights_balance_present_classes_and_ignore_absent_ones() -> None:
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(w, [4 / 6, 2.0, 0.0])


@pytest.mark.parametrize("kw", [
    {},
    {"weight_decay": 0.01},
    {"class_weighting": True},
    {"prox": 0.3},
    {"trainable": CLASSIFIER_KEYS},
])
def test_one_fit_step_is_exactly_one_gradient_step_of_the_documented_objective(kw: dict) -> None:
    """`fit` works on a flat in-place buffer for speed; it must still follow `loss_and_grads`."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    y = np.array([0, 0, 0, 1, 2] * 8)
    params = init_params(HeadConfig(8, 3, 5), rng)
    center = {k: v + 0.1 for k, v in params.items()} if "prox" in kw else None
    cfg = FitConfig(epochs=1, batch_size=40, weight_decay=kw.get("weight_decay", 0.0),
                    class_weighting=kw.get("class_weighting", False),
                    optimizer=OptimizerConfig(kind="sgd", lr=0.1, momentum=0.0))
    got = fit(params, x, y, cfg, np.random.default_rng(0), trainable=kw.get("trainable"),
              prox_center=center, prox_lambda=kw.get("prox", 0.0))
    sw = class_weights(y, 3)[y] if cfg.class_weighting else None
    _, grads = loss_and_grads(params, x, y, sample_weight=sw, weight_decay=cfg.weight_decay,
                              prox_center=center, prox_lambda=kw.get("prox", 0.0))
    for k in params:
        moved = k in kw.get("trainable", params)
        want = params[k] - 0.1 * grads[k] if moved else params[k]
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-6, err_msg=k)


def test_adam_first_step_moves_every_weight_by_about_lr() -> None:
    # With bias correction, Adam's first update is lr * sign(grad) (up to eps): a golden property.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 4)).astype(np.float32)
    y = rng.integers(0, 2, 16)
    params = init_params(HeadConfig(4, 2, 3), rng)
    params["adapter.b"] += 1.0  # every ReLU active, so no gradient is exactly zero
    got = fit(params, x, y, FitConfig(epochs=1, batch_size=16, weight_decay=0.0,
                                      optimizer=OptimizerConfig(lr=0.01)), rng)
    _, grads = loss_and_grads(params, x, y)
    for k in params:
        np.testing.assert_allclose(got[k] - params[k], -0.01 * np.sign(grads[k]), atol=1e-5, err_msg=k)


@pytest.mark.parametrize("adapter_dim", [0, 5])
def test_declared_shapes_are_the_built_ones(adapter_dim: int) -> None:
    cfg = HeadConfig(8, 3, adapter_dim)
    built = init_params(cfg, np.random.default_rng(0))
    assert cfg.shapes == {k: v.shape for k, v in built.items()}
