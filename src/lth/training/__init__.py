"""Training, the core's one loop: fit() and its pieces (masked SGD, lr schedule, epoch, stopping, checkpoint).

Layout (each imports only those before it): optim (masked SGD), schedule (rate per epoch), metrics,
epoch (one training pass, evaluation), stopping (early-stopping policy), state (what a fit carries, and
one epoch's step), checkpoint (state <-> files), fit (the loop).
"""

from lth.training.epoch import State, cap_gpu_memory, cpu_state, evaluate, resolve_device
from lth.training.fit import FitResult, fit
from lth.training.metrics import EpochMetrics, EvalResult
from lth.training.optim import MaskedSGD
from lth.training.schedule import LrSchedule

__all__ = ["EpochMetrics", "EvalResult", "FitResult", "LrSchedule", "MaskedSGD", "State", "cap_gpu_memory",
           "cpu_state", "evaluate", "fit", "resolve_device"]
