"""Keras 3 peer for benchmarks/bench_cpu.py: the seed notebook's own model code, timed on request.

Runs under an interpreter with TensorFlow and Keras (e.g. /work/venv-bench/bin/python); it needs
neither torch nor cnnlab. bench_cpu.py starts it once and keeps it for the whole benchmark, so each
model is built and compiled once. It is the one Keras copy of the networks in benchmarks/
(peers/torch_peer.py is the PyTorch one). Protocol: one request per line on stdin, one JSON line per reply
on stdout (everything else TensorFlow prints goes to stderr):

    (on start)      -> {"ok": true, "ready": true, "tensorflow": "2.21.0", "keras": ..., "import_seconds": ...}
    build convnet3  -> {"ok": true, "model": "convnet3", "params": 4060426, "build_seconds": ...,
                        "first_step_seconds": ...}   (the first train_on_batch traces the tf.function)
    convnet3 5      -> {"ok": true, "model": "convnet3", "seconds": [5 per-step wall times]}
    quit

Usage: python benchmarks/peers/keras_peer.py DATA_FOLDER [--seed 0], where DATA_FOLDER holds
train_images.npy (uint8, N x 28 x 28) and train_labels.npy (integers), as bench_cpu.py writes them.
A timed step is the seed's batch of 128 (random indices, gathered from the float32 array as
`fit` would) and one `train_on_batch`, whose returned loss makes it wait for the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

# Replies go to a private copy of stdout; anything else written to stdout (TensorFlow's C++ logs,
# stray prints) is sent to stderr so that it cannot corrupt the protocol.
_REPLIES = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_started = time.perf_counter()
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras.initializers import he_normal  # noqa: E402
from keras.layers import BatchNormalization, Conv2D, Dense, Dropout, Flatten, MaxPooling2D  # noqa: E402
from keras.models import Sequential  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - _started
# The notebook passes input_shape to its first layer; Keras 3 still accepts it with a warning.
warnings.filterwarnings("ignore", message=".*input_shape.*")

batch_size = 128
num_classes = 10
img_rows, img_cols = 28, 28
input_shape = (img_rows, img_cols, 1)


# ---------------------------------------------------------------------------------------------
# The seed notebook's models (/work/shared/seed/mnist_cnn_notebook.md), copied as written; only the
# BatchNormalization import moved (keras.layers.normalization no longer exists in Keras 3).


def build_convnet3() -> Sequential:
    convnet3 = Sequential()  # Initializing the model

    # First ConvNet
    convnet3.add(Conv2D(32, kernel_size=(3, 3), activation="relu", input_shape=input_shape))
    convnet3.add(Conv2D(64, kernel_size=(3, 3), activation="relu"))
    convnet3.add(Dropout(0.25))
    convnet3.add(Conv2D(128, kernel_size=(3, 3), activation="relu"))

    # maxpooling by (2,2 ) ,dropout,flattening
    convnet3.add(MaxPooling2D(pool_size=(2, 2)))
    convnet3.add(Dropout(0.25))
    convnet3.add(Flatten())

    # hidden_layer
    convnet3.add(Dense(256, activation="relu", kernel_initializer=he_normal(seed=None)))
    convnet3.add(Dropout(0.5))
    convnet3.add(Dense(num_classes, activation="softmax"))
    return convnet3


def build_convnet5() -> Sequential:
    convnet5 = Sequential()  # Initializing the model

    # First ConvNet
    convnet5.add(Conv2D(32, kernel_size=(5, 5), activation="relu", padding="same", input_shape=input_shape))

    # Second ConvNet
    convnet5.add(Conv2D(64, kernel_size=(5, 5), padding="same", activation="relu"))
    convnet5.add(MaxPooling2D(pool_size=(2, 2)))
    convnet5.add(Dropout(0.25))

    # Third ConvNet
    convnet5.add(Conv2D(96, kernel_size=(5, 5), padding="same", activation="relu"))
    # maxpooling by (2,2) ,dropout,flattening
    convnet5.add(MaxPooling2D(pool_size=(2, 2)))
    convnet5.add(Dropout(0.25))

    # Fourth ConvNet
    convnet5.add(Conv2D(128, kernel_size=(5, 5), padding="same", activation="relu"))
    convnet5.add(MaxPooling2D(pool_size=(2, 2)))
    convnet5.add(Dropout(0.25))

    # fifth Convnet
    convnet5.add(Conv2D(164, kernel_size=(5, 5), padding="same", activation="relu"))
    convnet5.add(MaxPooling2D(pool_size=(2, 2)))
    convnet5.add(Dropout(0.25))
    convnet5.add(Flatten())

    # hidden_layer
    convnet5.add(Dense(256, activation="relu", kernel_initializer=he_normal(seed=None)))
    convnet5.add(BatchNormalization())
    convnet5.add(Dropout(0.5))
    convnet5.add(Dense(num_classes, activation="softmax"))
    return convnet5


def build_convnet7() -> Sequential:
    convnet7 = Sequential()  # Initializing the model

    # First ConvNet
    convnet7.add(Conv2D(16, kernel_size=(2, 2), activation="relu", padding="same", input_shape=input_shape))

    # Second Convnet
    convnet7.add(Conv2D(32, kernel_size=(2, 2), padding="same", strides=(2, 2), activation="relu"))

    # 3rd ConvNet
    convnet7.add(Conv2D(64, kernel_size=(2, 2), padding="same", activation="relu"))

    # maxpooling by (2,2 ),dropout,flattening
    convnet7.add(Dropout(0.15))

    # fourth Convnet
    convnet7.add(Conv2D(96, kernel_size=(2, 2), padding="same", activation="relu"))
    convnet7.add(MaxPooling2D(pool_size=(2, 2)))
    convnet7.add(Dropout(0.39))

    # fifth Convnet
    convnet7.add(Conv2D(128, kernel_size=(2, 2), padding="same", activation="relu"))
    convnet7.add(MaxPooling2D(pool_size=(2, 2)))
    convnet7.add(Dropout(0.3))

    # sixth Convnet
    convnet7.add(Conv2D(164, kernel_size=(2, 2), padding="same", activation="relu"))

    # seventh Convnet
    convnet7.add(Conv2D(164, kernel_size=(2, 2), padding="same", activation="relu"))

    convnet7.add(MaxPooling2D(pool_size=(2, 2)))
    convnet7.add(Dropout(0.4))
    convnet7.add(Flatten())

    # hidden_layer
    convnet7.add(Dense(256, activation="relu", kernel_initializer=he_normal(seed=None)))  # 1 hidden layer
    convnet7.add(BatchNormalization())
    convnet7.add(Dropout(0.5))
    convnet7.add(Dense(148, activation="relu", kernel_initializer=he_normal(seed=None)))  # 2 hidden layer
    convnet7.add(BatchNormalization())
    convnet7.add(Dropout(0.5))
    convnet7.add(Dense(128, activation="relu", kernel_initializer=he_normal(seed=None)))  # 3 hidden layer
    convnet7.add(BatchNormalization())
    convnet7.add(Dropout(0.5))
    convnet7.add(Dense(num_classes, activation="softmax"))
    return convnet7


BUILDERS = {"convnet3": build_convnet3, "convnet5": build_convnet5, "convnet7": build_convnet7}


# ---------------------------------------------------------------------------------------------
# Serving


class Peer:
    """The data (as the notebook prepares it) and the compiled models, each with its batch stream."""

    def __init__(self, folder: str, seed: int) -> None:
        images = np.load(os.path.join(folder, "train_images.npy"))
        labels = np.load(os.path.join(folder, "train_labels.npy"))
        # The notebook's preparation: (N, 28, 28, 1) float32 in [0, 1], one-hot labels.
        self.x_train = images.reshape(images.shape[0], img_rows, img_cols, 1).astype("float32") / 255
        self.y_train = keras.utils.to_categorical(labels, num_classes)
        self.seed = seed
        self.models: dict[str, keras.Model] = {}
        self.orders: dict[str, tuple[np.random.Generator, np.ndarray, int]] = {}

    def _batch(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The next 128 indices of the model's shuffled epoch, gathered as `fit` would."""
        rng, order, position = self.orders[name]
        if position + batch_size > len(order):
            order, position = rng.permutation(len(self.x_train)), 0
        index = order[position : position + batch_size]
        self.orders[name] = (rng, order, position + batch_size)
        return self.x_train[index], self.y_train[index]

    def build(self, name: str) -> dict:
        keras.utils.set_random_seed(self.seed)
        started = time.perf_counter()
        model = BUILDERS[name]()
        model.compile(
            optimizer=keras.optimizers.Adam(), loss=keras.losses.categorical_crossentropy, metrics=["accuracy"]
        )
        build_seconds = time.perf_counter() - started
        rng = np.random.default_rng(self.seed)
        self.orders[name] = (rng, rng.permutation(len(self.x_train)), 0)
        self.models[name] = model
        x, y = self._batch(name)
        started = time.perf_counter()
        model.train_on_batch(x, y)  # traces and compiles the train function
        first_step_seconds = time.perf_counter() - started
        return {
            "model": name,
            "params": int(model.count_params()),
            "build_seconds": build_seconds,
            "first_step_seconds": first_step_seconds,
            "jit_compile": bool(getattr(model, "jit_compile", False)),
        }

    def time_steps(self, name: str, steps: int) -> dict:
        if name not in self.models:
            raise ValueError(f"model {name} is not built; send 'build {name}' first")
        model, seconds = self.models[name], []
        for _ in range(steps):
            started = time.perf_counter()
            x, y = self._batch(name)
            model.train_on_batch(x, y)  # returns the loss as a Python float: the step has finished
            seconds.append(time.perf_counter() - started)
        return {"model": name, "seconds": seconds}


def reply(message: dict) -> None:
    _REPLIES.write(json.dumps(message) + "\n")
    _REPLIES.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_folder", help="folder with train_images.npy and train_labels.npy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        peer = Peer(args.data_folder, args.seed)
    except Exception as exc:  # noqa: BLE001 - reported to the benchmark, which goes on without Keras
        reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    reply(
        {
            "ok": True,
            "ready": True,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
            "import_seconds": IMPORT_SECONDS,
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "train_images": int(len(peer.x_train)),
        }
    )
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        try:
            if words[0] == "build" and len(words) == 2 and words[1] in BUILDERS:
                reply({"ok": True, **peer.build(words[1])})
            elif len(words) == 2 and words[0] in BUILDERS and words[1].isdigit():
                reply({"ok": True, **peer.time_steps(words[0], int(words[1]))})
            else:
                reply(
                    {
                        "ok": False,
                        "error": f"unknown request {line.strip()!r}; expected 'build NAME', "
                        f"'NAME STEPS' or 'quit' with NAME in {sorted(BUILDERS)}",
                    }
                )
        except Exception as exc:  # noqa: BLE001 - one failed request must not kill the peer
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
