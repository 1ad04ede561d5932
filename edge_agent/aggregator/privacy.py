"""The privacy budget of the aggregator's differential privacy (learning/dp.py adds the noise): epsilon at a
chosen delta, computed by Google's `dp-accounting` library (its RDP accountant), never by hand-written maths.

The library is imported only when a budget is asked for: only an aggregator with DP on needs `dp-accounting`
(the `aggregator` extra); a device never imports this module.

What the number assumes: devices selected uniformly at random with probability `fraction` each round
(Poisson sampling; the aggregator samples a fixed-size subset, the usual approximation), one update per
device per round, and every noisy round counted.
"""

from __future__ import annotations

INSTALL_HINT = "pip install 'edge-fl[aggregator]' (or pip install dp-accounting)"


def epsilon(noise_multiplier: float, sampling_fraction: float, rounds: int, delta: float) -> float:
    """The privacy budget after `rounds` noisy rounds: epsilon of (epsilon, delta)-DP; inf without noise."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    try:
        import dp_accounting  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise RuntimeError(f"differential privacy needs the dp-accounting library: {INSTALL_HINT}") from None
    event: object = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_fraction < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sampling_fraction, event)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))
