"""Task 1b: Keras 3 / TensorFlow CPU steady-state ms per batch of 128 for the
seed notebook's three models (seed code, modernised imports only).
Run with /work/venv-bench.  Usage: python explore_keras.py [convnet3 convnet5 convnet7]"""
import os, sys, time, statistics
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import tensorflow as tf
import keras
from keras.models import Sequential
from keras.layers import Dense, Dropout, Flatten, Conv2D, MaxPooling2D, BatchNormalization, Input
from keras.initializers import he_normal

num_classes, input_shape, batch_size = 10, (28, 28, 1), 128


def convnet3():
    m = Sequential([Input(input_shape)])
    m.add(Conv2D(32, kernel_size=(3, 3), activation='relu'))
    m.add(Conv2D(64, kernel_size=(3, 3), activation='relu'))
    m.add(Dropout(0.25))
    m.add(Conv2D(128, kernel_size=(3, 3), activation='relu'))
    m.add(MaxPooling2D(pool_size=(2, 2)))
    m.add(Dropout(0.25))
    m.add(Flatten())
    m.add(Dense(256, activation='relu', kernel_initializer=he_normal(seed=None)))
    m.add(Dropout(0.5))
    m.add(Dense(num_classes, activation='softmax'))
    return m


def convnet5():
    m = Sequential([Input(input_shape)])
    m.add(Conv2D(32, kernel_size=(5, 5), activation='relu', padding='same'))
    for ch in (64, 96, 128, 164):
        m.add(Conv2D(ch, kernel_size=(5, 5), padding='same', activation='relu'))
        m.add(MaxPooling2D(pool_size=(2, 2)))
        m.add(Dropout(0.25))
    m.add(Flatten())
    m.add(Dense(256, activation='relu', kernel_initializer=he_normal(seed=None)))
    m.add(BatchNormalization())
    m.add(Dropout(0.5))
    m.add(Dense(num_classes, activation='softmax'))
    return m


def convnet7():
    m = Sequential([Input(input_shape)])
    m.add(Conv2D(16, kernel_size=(2, 2), activation='relu', padding='same'))
    m.add(Conv2D(32, kernel_size=(2, 2), padding='same', strides=(2, 2), activation='relu'))
    m.add(Conv2D(64, kernel_size=(2, 2), padding='same', activation='relu'))
    m.add(Dropout(0.15))
    m.add(Conv2D(96, kernel_size=(2, 2), padding='same', activation='relu'))
    m.add(MaxPooling2D(pool_size=(2, 2)))
    m.add(Dropout(0.39))
    m.add(Conv2D(128, kernel_size=(2, 2), padding='same', activation='relu'))
    m.add(MaxPooling2D(pool_size=(2, 2)))
    m.add(Dropout(0.3))
    m.add(Conv2D(164, kernel_size=(2, 2), padding='same', activation='relu'))
    m.add(Conv2D(164, kernel_size=(2, 2), padding='same', activation='relu'))
    m.add(MaxPooling2D(pool_size=(2, 2)))
    m.add(Dropout(0.4))
    m.add(Flatten())
    for units in (256, 148, 128):
        m.add(Dense(units, activation='relu', kernel_initializer=he_normal(seed=None)))
        m.add(BatchNormalization())
        m.add(Dropout(0.5))
    m.add(Dense(num_classes, activation='softmax'))
    return m


class BatchTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__(); self.t = []; self.epoch = 0
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_begin(self, batch, logs=None):
        self.t0 = time.perf_counter()
    def on_train_batch_end(self, batch, logs=None):
        if self.epoch >= 1:
            self.t.append((time.perf_counter() - self.t0) * 1e3)


def mm_gflops(n=2048):
    a = tf.random.normal((n, n)); b = tf.random.normal((n, n))
    for _ in range(2): tf.linalg.matmul(a, b).numpy()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter(); tf.linalg.matmul(a, b).numpy(); ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts) / 1e9


print("tensorflow", tf.__version__, "keras", keras.__version__, "numpy", np.__version__,
      "intra", tf.config.threading.get_intra_op_parallelism_threads(),
      "inter", tf.config.threading.get_inter_op_parallelism_threads())
print(f"TF fp32 matmul 2048: {mm_gflops():.1f} GFLOP/s", flush=True)
rng = np.random.default_rng(0)
nb = int(os.environ.get("NB", "10"))
x = rng.random((batch_size * nb, 28, 28, 1), dtype=np.float32)
y = keras.utils.to_categorical(rng.integers(0, 10, batch_size * nb), num_classes)
for name in sys.argv[1:] or ["convnet3", "convnet5", "convnet7"]:
    m = globals()[name]()
    m.compile(optimizer=keras.optimizers.Adam(), loss=keras.losses.categorical_crossentropy, metrics=['accuracy'])
    cb = BatchTimer()
    t0 = time.perf_counter()
    m.fit(x, y, batch_size=batch_size, epochs=2, verbose=0, callbacks=[cb], shuffle=False)
    fit_s = time.perf_counter() - t0
    # train_on_batch steady state
    xb, yb = x[:batch_size], y[:batch_size]
    for _ in range(3): m.train_on_batch(xb, yb)
    tb = []
    for _ in range(nb):
        t1 = time.perf_counter(); m.train_on_batch(xb, yb); tb.append((time.perf_counter() - t1) * 1e3)
    print(f"{name}: params {m.count_params():,}  fit epoch-2 per batch median {statistics.median(cb.t):.1f} ms "
          f"(min {min(cb.t):.1f}, n={len(cb.t)}); train_on_batch median {statistics.median(tb):.1f} ms "
          f"(min {min(tb):.1f}); fit total incl. compile {fit_s:.1f}s", flush=True)
print(f"TF fp32 matmul 2048: {mm_gflops():.1f} GFLOP/s")
