"""Adapters for training loops that are not the user's own.

- :mod:`elra.integrations.transformers`: ``ElraTrainer``, a drop-in for
  ``transformers.Trainer``.
- :mod:`elra.integrations.accelerate`: ``accumulate``, the micro-batch context
  for an Accelerate loop.

Each needs its framework (``pip install 'elra[transformers]'``); nothing here
is imported by ``import elra``.
"""
