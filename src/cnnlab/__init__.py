"""cnnlab: train, evaluate and compare convolutional networks on MNIST-family datasets."""

__version__ = "0.1.0"
