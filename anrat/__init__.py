"""anrat: training with the normalized risk-averting error (NRAE) and adaptive lambda (ANRAT).

``anrat.functional`` holds the functions (``nrae``, ``rae``, ``rae_feasible``, ``tilted_mean``,
``per_sample_loss``); the losses below are their ``nn.Module`` twins.
"""

from anrat import functional
from anrat.errors import InputError
from anrat.losses import ANRATLoss, NRAELoss, PlainLoss

__all__ = ["ANRATLoss", "InputError", "NRAELoss", "PlainLoss", "functional"]
__version__ = "0.1.0"
