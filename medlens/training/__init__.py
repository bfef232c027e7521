"""Training: from a data folder to a calibrated model in a run folder.

* :mod:`~medlens.training.trainer` - :func:`~medlens.training.trainer.train`, step by step;
* :mod:`~medlens.training.training_data` - the splits loaded, checked and decoded;
* :mod:`~medlens.training.resolve` - the input (size, channels, mean/std) and learning rate,
  resolved in one step;
* :mod:`~medlens.training.stages` - the ``head``, ``finetune`` and ``full`` stages;
* :mod:`~medlens.training.batches` - what a stage trains on, batch by batch;
* :mod:`~medlens.training.loop` - the epoch loop every stage shares, and checkpoints;
* :mod:`~medlens.training.guard_fit` - the out-of-distribution guard fit (and refit);
* :mod:`~medlens.training.device` - device, precision, seeds, batch-norm momentum.
"""
