"""anrat: training with the normalized risk-averting error (NRAE) and adaptive lambda (ANRAT).

``anrat.functional`` holds the functions (``nrae``, ``rae``, ``rae_feasible``, ``tilted_mean``,
``per_sample_loss``); the losses below are their ``nn.Module`` twins. ``ESSLoss`` (the scale-free
tilt, a drop-in for ``nn.CrossEntropyLoss``) and ``ESSSchedule`` (its rho over the epochs) work in
any training loop. Under ``torch.distributed``,
``anrat.distributed.GlobalBatchLoss`` wraps a loss to aggregate the global batch over all ranks.
"""

from anrat import functional
from anrat.errors import InputError
from anrat.ess import ESSLoss, ESSSchedule
from anrat.functional import LossKind, TiltedBackend
from anrat.losses import ANRATLoss, BatchLoss, NRAELoss, PlainLoss

__all__ = [
    "ANRATLoss",
    "BatchLoss",
    "ESSLoss",
    "ESSSchedule",
    "InputError",
    "LossKind",
    "NRAELoss",
    "PlainLoss",
    "TiltedBackend",
    "functional",
]
__version__ = "0.1.0"
