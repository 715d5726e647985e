"""The PyTorch peer: the seed notebook's three networks as a PyTorch user writes them.

Plain eager fp32 in the style of pytorch/examples mnist/main.py: hand-written `nn.Module`s in
PyTorch's NCHW layout, `F.dropout`, `log_softmax` + `nll_loss`, `torch.optim.Adam` (with Keras's
epsilon, 1e-7), the float input made per batch from the uint8 images and `loss.item()` every batch.
It is the one copy of these networks in benchmarks/: every benchmark and explore script imports
it (the Keras peer, keras_peer.py, is the other side and runs in its own interpreter). It imports
neither cnnlab nor anything but torch, so what it measures is PyTorch alone.

`dropout` is pluggable (`drop(x, p, training) -> tensor`, default `F.dropout`) so that the explore
scripts can time other dropout masks on otherwise identical networks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Dropout = Callable[[torch.Tensor, float, bool], torch.Tensor]


class ConvNet3(nn.Module):
    def __init__(self, dropout: Dropout = F.dropout) -> None:
        super().__init__()
        self.dropout = dropout
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.conv3 = nn.Conv2d(64, 128, 3)
        self.fc1 = nn.Linear(15488, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop, training = self.dropout, self.training
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = drop(x, 0.25, training)
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(x, 2)
        x = drop(x, 0.25, training)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = drop(x, 0.5, training)
        return F.log_softmax(self.fc2(x), dim=1)


class ConvNet5(nn.Module):
    def __init__(self, dropout: Dropout = F.dropout) -> None:
        super().__init__()
        self.dropout = dropout
        channels = [1, 32, 64, 96, 128, 164]
        self.convs = nn.ModuleList(nn.Conv2d(channels[i], channels[i + 1], 5, padding=2) for i in range(5))
        self.fc1 = nn.Linear(164, 256)
        self.bn1 = nn.BatchNorm1d(256, eps=1e-3, momentum=0.01)  # Keras's BatchNormalization defaults
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop, training = self.dropout, self.training
        x = F.relu(self.convs[0](x))
        for conv in self.convs[1:]:
            x = F.relu(conv(x))
            x = F.max_pool2d(x, 2)
            x = drop(x, 0.25, training)
        x = torch.flatten(x, 1)
        x = self.bn1(F.relu(self.fc1(x)))
        x = drop(x, 0.5, training)
        return F.log_softmax(self.fc2(x), dim=1)


def _pad_same_2x2(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 'same' padding for a 2x2 kernel at stride 1: one row/column at the bottom/right."""
    return F.pad(x, (0, 1, 0, 1))


class ConvNet7(nn.Module):
    def __init__(self, dropout: Dropout = F.dropout) -> None:
        super().__init__()
        self.dropout = dropout
        self.conv1 = nn.Conv2d(1, 16, 2)
        self.conv2 = nn.Conv2d(16, 32, 2, stride=2)  # 'same' at stride 2 on 28x28 pads nothing
        self.conv3 = nn.Conv2d(32, 64, 2)
        self.conv4 = nn.Conv2d(64, 96, 2)
        self.conv5 = nn.Conv2d(96, 128, 2)
        self.conv6 = nn.Conv2d(128, 164, 2)
        self.conv7 = nn.Conv2d(164, 164, 2)
        self.fc1 = nn.Linear(164, 256)
        self.bn1 = nn.BatchNorm1d(256, eps=1e-3, momentum=0.01)
        self.fc2 = nn.Linear(256, 148)
        self.bn2 = nn.BatchNorm1d(148, eps=1e-3, momentum=0.01)
        self.fc3 = nn.Linear(148, 128)
        self.bn3 = nn.BatchNorm1d(128, eps=1e-3, momentum=0.01)
        self.fc4 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop, training = self.dropout, self.training
        x = F.relu(self.conv1(_pad_same_2x2(x)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(_pad_same_2x2(x)))
        x = drop(x, 0.15, training)
        x = F.relu(self.conv4(_pad_same_2x2(x)))
        x = F.max_pool2d(x, 2)
        x = drop(x, 0.39, training)
        x = F.relu(self.conv5(_pad_same_2x2(x)))
        x = F.max_pool2d(x, 2)
        x = drop(x, 0.3, training)
        x = F.relu(self.conv6(_pad_same_2x2(x)))
        x = F.relu(self.conv7(_pad_same_2x2(x)))
        x = F.max_pool2d(x, 2)
        x = drop(x, 0.4, training)
        x = torch.flatten(x, 1)
        x = drop(self.bn1(F.relu(self.fc1(x))), 0.5, training)
        x = drop(self.bn2(F.relu(self.fc2(x))), 0.5, training)
        x = drop(self.bn3(F.relu(self.fc3(x))), 0.5, training)
        return F.log_softmax(self.fc4(x), dim=1)


MODELS: dict[str, type[nn.Module]] = {"convnet3": ConvNet3, "convnet5": ConvNet5, "convnet7": ConvNet7}


def build(name: str, dropout: Dropout = F.dropout) -> nn.Module:
    """The named network (PyTorch's default initialisation), in training mode."""
    return MODELS[name](dropout).train()


def parameter_count(model: nn.Module) -> int:
    """Its number of parameters: the same as the cnnlab spec's trainable parameters."""
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: nn.Module, **options) -> torch.optim.Adam:
    """torch.optim.Adam with the seed's learning rate and Keras's epsilon; `options` e.g. fused=True."""
    return torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7, **options)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) images -> float (N, 1, 28, 28) in [0, 1], as the examples' transform does."""
    return images.unsqueeze(1).float() / 255


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor, target: torch.Tensor) -> float:
    """pytorch/examples' training-loop body; `loss.item()` waits for the step to finish."""
    optimizer.zero_grad()
    output = model(data)
    loss = F.nll_loss(output, target)
    loss.backward()
    optimizer.step()
    return loss.item()
