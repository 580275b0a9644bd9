"""ELRA: a PyTorch optimizer that adapts its own step size, batch size and weight decay."""

from .optimizer import ElraOptimizer

__all__ = ["ElraOptimizer"]
__version__ = "0.1.0"

import logging as _logging

_logging.getLogger("elra").addHandler(_logging.NullHandler())
