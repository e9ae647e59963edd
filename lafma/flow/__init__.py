"""Flow matching as a small library: path, loss, guidance and ODE solvers, each by its maths."""

from lafma.flow.guidance import ClassifierFreeGuidance
from lafma.flow.loss import (
           drop_condition,
           flow_matching_loss,
           heldout_fm_loss,
           pad_tokens,
           sample_times,
)
from lafma.flow.path import OTPath
from lafma.flow.solvers import METHODS, Solution, solve

__all__ = ["METHODS", "ClassifierFreeGuidance", "OTPath", "Solution", "drop_condition",
           "flow_matching_loss", "heldout_fm_loss", "pad_tokens", "sample_times", "solve"]
