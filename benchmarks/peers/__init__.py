"""The two peers cnnlab is measured against: torch_peer (eager PyTorch) and keras_peer (Keras 3, run as its
own process under an interpreter with TensorFlow)."""
