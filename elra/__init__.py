"""ELRA: a PyTorch optimizer that adapts its own step size, batch size and weight decay."""

import logging

from .grad_scaler import ElraGradScaler
from .optimizer import ElraOptimizer
from .sync import grad_sync

__all__ = ["ElraGradScaler", "ElraOptimizer", "grad_sync"]
__version__ = "0.1.0"

logging.getLogger("elra").addHandler(logging.NullHandler())
