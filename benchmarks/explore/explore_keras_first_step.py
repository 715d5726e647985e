"""Why do Keras 3 and cnnlab part ways in fp32? The first Adam step, variable by variable.

From the same initial weights and the first batch (as benchmarks/keras_equality.py sets them up),
it compares the gradients of the two frameworks (Keras's by autograd through its own layers), then
the weights after one `train_on_batch` and one cnnlab engine step. For the variable that differs
most after the step, it counts the components whose cnnlab gradient is below 1e-5 in magnitude
(rounding noise around a true zero) and the share of the difference they carry: Adam's first step is
lr * g / (|g| + 3.2e-6) (m = 0.1 g, sqrt(v) = 0.0316 |g|, epsilon 1e-7), so noise of 5e-7 in a
gradient that is mathematically zero becomes an update of 0.13 lr, of either sign, differently in
each framework.

    KERAS_BACKEND=torch python explore_keras_first_step.py convnet7 [batch]      (from this folder)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from keras_equality import (  # noqa: E402
    batches_for,
    import_keras,
    keras_json,
    keras_weights,
    model_spec,
    relative_l2,
    train_cnnlab,
)

from cnnlab.engine import to_input  # noqa: E402
from cnnlab.keras_weights import keras_layer_weights, state_dict_from_keras  # noqa: E402
from cnnlab.models import build_model  # noqa: E402


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "convnet7"
    batch_size = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    keras = import_keras()
    spec = model_spec(name)
    data_dir = os.environ.get("CNNLAB_DATA_DIR")
    images, labels, data = batches_for(spec, batch_size, Path(data_dir) if data_dir else None)
    x = images.numpy().astype(np.float32).reshape(len(images), *spec.input_shape) / 255
    y = np.eye(spec.num_classes, dtype=np.float32)[labels.numpy()]
    keras.utils.set_random_seed(0)
    model = keras.models.model_from_json(keras_json(name, spec)[0])
    model.compile(optimizer=keras.optimizers.Adam(), loss="categorical_crossentropy", jit_compile=False)
    initial = keras_weights(model)
    names = [layer.name for layer in model.layers]

    # Gradients: Keras's through its own layers, then its weights put back (training=True moves BN's statistics).
    loss = keras.losses.categorical_crossentropy(torch.from_numpy(y), model(torch.from_numpy(x), training=True)).mean()
    variables = [v for layer in model.layers for v in layer.trainable_weights]
    keras_grads = dict(
        zip([v.path for v in variables], torch.autograd.grad(loss, [v.value for v in variables]), strict=True)
    )
    for layer, arrays in zip(model.layers, initial):
        layer.set_weights([arrays[v.path.rsplit("/", 1)[-1]] for v in layer.weights])
    ours = build_model(spec)
    ours.load_state_dict(state_dict_from_keras(spec, initial, name), strict=False)
    ours.train()
    torch.nn.functional.cross_entropy(ours(to_input(images, channels_last=False)), labels).backward()
    with torch.no_grad():  # the gradients in Keras's names and layouts: the module with grads for weights
        for p in ours.parameters():
            p.copy_(p.grad)
    our_grads = keras_layer_weights(ours)

    model.train_on_batch(x, y)
    after_keras = keras_weights(model)
    _, after_ours, _, _ = train_cnnlab(spec, initial, name, images, labels, 1, batch_size)
    print(f"{name}, {data} batch of {batch_size}, Keras {keras.__version__}, torch {torch.__version__}")
    print("variable | gradient rel L2 | weights after step 1 rel L2")
    rows = []
    for i, layer_name in enumerate(names):
        for key, after in after_keras[i].items():
            path = f"{layer_name}/{key}"
            grad = relative_l2(our_grads[i][key], keras_grads[path].detach().numpy()) if path in keras_grads else None
            rows.append((relative_l2(after_ours[i][key], after), path, grad, i, key))
            print(f"{path} | {'-' if grad is None else f'{grad:.1e}'} | {rows[-1][0]:.1e}")
    worst, path, _, i, key = max(rows, key=lambda r: r[0])
    if key in our_grads[i]:
        g = our_grads[i][key].ravel()
        difference = (after_ours[i][key] - after_keras[i][key]).ravel()
        tiny = np.abs(g) < 1e-5
        share = np.linalg.norm(difference[tiny]) / max(np.linalg.norm(difference), 1e-30)
        print(
            f"worst after step 1: {path} {worst:.1e}; {tiny.sum()} of {g.size} components have |gradient| < 1e-5 "
            f"(largest {np.abs(g[tiny]).max() if tiny.any() else 0:.1e}) and carry {share:.1%} of the difference; "
            f"median |gradient| of the others {np.median(np.abs(g[~tiny])):.1e}"
        )


if __name__ == "__main__":
    main()
