"""cnnlab: train, evaluate and compare convolutional networks on MNIST-family datasets.

The Python API is in `cnnlab.api` (plan_run, run, resume, evaluate, report); configuration
dataclasses are in `cnnlab.config`.
"""

__version__ = "0.2.0"
