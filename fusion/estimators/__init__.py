"""Mutual-information estimators shared by the fusion models.

Every estimator's ``forward`` returns ``Estimate(estimate, loss)`` in nats (see ``critics.Estimate``):

- lower bounds, ``loss = -estimate`` (maximise MI): ``infonce`` (capped at log B), ``dv`` (Donsker-Varadhan),
  ``mine`` (DV with the moving-average gradient correction), ``tcmax`` (DV bound on total correlation
  with the classifier head as critic; ``TCMaxSampled`` for non-additive critics);
- upper bounds, ``loss = +estimate`` (minimise MI): ``club`` (fit q with ``learning_loss`` in its own
  optimiser group), ``vib`` (Gaussian bottleneck KL to N(0, I)).

Reported measures, not training terms (``measure``): ``linear_gaussian_mi`` (the CCA / linear-Gaussian MI, exact
for jointly Gaussian variables), ``heldout_infonce`` (an InfoNCE lower bound with a fresh critic fitted on one
split and scored on another) and ``redundancy`` (both, per modality pair).

``ESTIMATORS`` is a plain dict name -> class; ``get_estimator(name, **kwargs)`` builds one.
"""

from __future__ import annotations

from torch import nn

from fusion.estimators.club import CLUB
from fusion.estimators.critics import Estimate
from fusion.estimators.infonce import InfoNCE
from fusion.estimators.measure import heldout_infonce, linear_gaussian_mi, redundancy
from fusion.estimators.mine import DV, MINE
from fusion.estimators.tcmax import TCMax, TCMaxSampled
from fusion.estimators.vib import GaussianVIB

ESTIMATORS: dict[str, type[nn.Module]] = {
    "infonce": InfoNCE,
    "mine": MINE,
    "dv": DV,
    "club": CLUB,
    "vib": GaussianVIB,
    "tcmax": TCMax,
}


class UnknownEstimatorError(KeyError, ValueError):
    """Raised for an estimator name not in ``ESTIMATORS``; the message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def get_estimator(name: str, **kwargs: object) -> nn.Module:
    """Build the estimator registered as ``name`` with ``kwargs`` passed to its constructor."""
    if name not in ESTIMATORS:
        valid = ", ".join(sorted(ESTIMATORS))
        raise UnknownEstimatorError(f"unknown estimator {name!r}; valid estimators: {valid}")
    return ESTIMATORS[name](**kwargs)


__all__ = [
    "CLUB",
    "DV",
    "ESTIMATORS",
    "MINE",
    "Estimate",
    "GaussianVIB",
    "InfoNCE",
    "TCMax",
    "TCMaxSampled",
    "UnknownEstimatorError",
    "get_estimator",
    "heldout_infonce",
    "linear_gaussian_mi",
    "redundancy",
]
