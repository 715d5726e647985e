"""Tests for cnnlab.datasets: the registry, the IDX reader, local loading, cache and download.

Every file is generated in tmp_path and every download goes to an HTTP server on 127.0.0.1
started by the test; no test touches a real mirror. `test_real_*` read the shared data when
CNNLAB_DATA_DIR points at it (CI sets it to ../shared/data).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import re
import socket
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab import datasets
from cnnlab.datasets import (
    DATASETS,
    FILE_KEYS,
    DatasetInfo,
    dataset_status,
    default_cache_dir,
    download_file,
    file_md5,
    load_dataset,
    read_idx,
)
from cnnlab.errors import DataError, DataWarning
from synthetic import TEST_COUNT, TRAIN_COUNT, idx_bytes, tiny_split_arrays, write_dataset_folder, write_idx

# ----------------------------------------------------------------------------------------------
# Helpers


def register_tiny(monkeypatch, folder: Path, mirrors: tuple[str, ...] = ()) -> DatasetInfo:
    """Point the registry's mnist entry at the tiny files in folder (their MD5s, given mirrors)."""
    info = dataclasses.replace(
        DATASETS["mnist"],
        md5={key: file_md5(folder / DATASETS["mnist"].files[key]) for key in FILE_KEYS},
        mirrors=mirrors,
    )
    monkeypatch.setitem(datasets.DATASETS, "mnist", info)
    return info


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep the test output clean
        pass


@pytest.fixture
def http_root(tmp_path):
    """Serve a fresh folder over HTTP on 127.0.0.1; yield (folder, base URL ending in /)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll interval keeps shutdown() (and so each test) fast.
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def dead_url():
    """A base URL on 127.0.0.1 where nothing listens (connection refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(autouse=True)
def no_real_network(monkeypatch):
    """Fail loudly if any test tries to reach a host other than 127.0.0.1."""
    real_urlopen = datasets.urllib.request.urlopen

    def guarded(request, *args, **kwargs):
        url = request.full_url if hasattr(request, "full_url") else str(request)
        assert url.startswith("http://127.0.0.1:"), f"test tried to reach the network: {url}"
        return real_urlopen(request, *args, **kwargs)

    monkeypatch.setattr(datasets.urllib.request, "urlopen", guarded)


# ----------------------------------------------------------------------------------------------
# Registry


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_registry_entry_is_complete(name):
    info = DATASETS[name]
    assert info.name == name
    assert len(info.classes) == 10 and len(set(info.classes)) == 10
    assert set(info.files) == set(FILE_KEYS) == set(info.md5)
    assert all(re.fullmatch(r"[0-9a-f]{32}", digest) for digest in info.md5.values())
    assert len(set(info.md5.values())) == 4
    assert all(name.endswith("-ubyte.gz") for name in info.files.values())
    assert info.mirrors and all(m.startswith(("http://", "https://")) for m in info.mirrors)
    assert (info.train_size, info.test_size) == (60_000, 10_000)
    assert info.licence and info.homepage.startswith(("http://", "https://"))


def test_registry_known_values():
    mnist = DATASETS["mnist"]
    assert mnist.md5 == {
        "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
        "test_images": "9fb629c4189551a2d022fa330f9573f3",
        "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    assert mnist.mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert mnist.classes == tuple("0123456789")
    assert DATASETS["fashion-mnist"].classes[0] == "T-shirt/top"
    assert DATASETS["fashion-mnist"].classes[-1] == "Ankle boot"
    kmnist_classes = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
    assert DATASETS["kmnist"].classes == kmnist_classes


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'cifar10'") as caught:
        load_dataset("cifar10", data_dir=tmp_path)
    for name in DATASETS:
        assert name in str(caught.value)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNLAB_HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home"
    monkeypatch.delenv("CNNLAB_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "cnnlab"


# ----------------------------------------------------------------------------------------------
# IDX reader


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_read_idx_round_trip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    # The extension says nothing: a raw file named .gz and a gzip file without it both read.
    path = write_idx(tmp_path / ("data" if compress else "data.gz"), array, compress=compress)
    result = read_idx(path)
    assert result.dtype == np.uint8 and result.shape == (2, 3, 4)
    np.testing.assert_array_equal(result, array)
    result[0, 0, 0] = 7  # writable, so torch.from_numpy shares it without a warning


def _corrupt(tmp_path: Path, data: bytes, compress: bool = False) -> Path:
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


GOOD = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x01\x00\x08\x03" + GOOD[4:], "bad magic number"),
        (b"PK\x03\x04" + GOOD[4:], "bad magic number"),  # a zip file
        (b"\x00\x00\x0c\x03" + GOOD[4:], "not unsigned byte"),  # int32 IDX
        (GOOD[:2], "too short"),
        (GOOD[:10], "truncated header"),
        (GOOD[:-1], "truncated file"),
        (GOOD + b"\x00\x00", "trailing garbage"),
    ],
    ids=["magic", "zip", "dtype", "tiny", "header", "truncated", "trailing"],
)
@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_read_idx_rejects_bad_files(tmp_path, data, problem, compress):
    path = _corrupt(tmp_path, data, compress=compress)
    with pytest.raises(DataError, match=problem) as caught:
        read_idx(path)
    message = str(caught.value)
    assert str(path) in message
    assert "replace it" in message  # the fix
    assert "\n" not in message


@pytest.mark.parametrize(
    "damage",
    [
        lambda gz: gz[: len(gz) // 2],  # download cut short
        lambda gz: gz[:20] + bytes(b ^ 0xFF for b in gz[20:40]) + gz[40:],  # flipped bytes
        lambda gz: gz[:-8] + b"\x00" * 8,  # wrong CRC and length
    ],
    ids=["cut", "flipped", "crc"],
)
def test_read_idx_rejects_corrupt_gzip(tmp_path, damage):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(damage(gzip.compress(GOOD, mtime=0)))
    with pytest.raises(DataError, match="corrupt gzip data") as caught:
        read_idx(path)
    assert str(path) in str(caught.value) and "replace it" in str(caught.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as caught:
        read_idx(tmp_path / "nope.gz")
    assert str(tmp_path / "nope.gz") in str(caught.value)


# ----------------------------------------------------------------------------------------------
# Loading from a data dir


def test_load_from_data_dir_verified(tmp_path, monkeypatch):
    arrays = tiny_split_arrays()
    write_dataset_folder(tmp_path / "mnist", arrays)
    register_tiny(monkeypatch, tmp_path / "mnist")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matching checksums: no warning at all
        dataset = load_dataset("mnist", data_dir=tmp_path)
    assert dataset.verified and dataset.unverified == ()
    assert dataset.source == tmp_path / "mnist"
    assert dataset.classes == DATASETS["mnist"].classes
    assert dataset.train_images.dtype == torch.uint8
    assert dataset.train_images.shape == (TRAIN_COUNT, 28, 28)
    assert dataset.test_images.shape == (TEST_COUNT, 28, 28)
    assert dataset.train_labels.dtype == torch.int64 and dataset.test_labels.dtype == torch.int64
    np.testing.assert_array_equal(dataset.train_images.numpy(), arrays["train_images"])
    np.testing.assert_array_equal(dataset.test_labels.numpy(), arrays["test_labels"])


def test_load_from_data_dir_warns_once_on_checksum_mismatch(tmp_path):
    # The real registry's checksums cannot match generated files: all four differ.
    write_dataset_folder(tmp_path / "mnist")
    with pytest.warns(DataWarning) as record:
        dataset = load_dataset("mnist", data_dir=tmp_path)
    assert len(record) == 1
    message = str(record[0].message)
    assert "4 of 4 files" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "published numbers" in message
    assert not dataset.verified and len(dataset.unverified) == 4


def test_load_from_data_dir_names_only_mismatching_files(tmp_path, monkeypatch):
    folder = tmp_path / "mnist"
    write_dataset_folder(folder)
    register_tiny(monkeypatch, folder)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(TRAIN_COUNT, dtype=np.uint8))
    with pytest.warns(DataWarning) as record:
        dataset = load_dataset("mnist", data_dir=tmp_path)
    assert len(record) == 1
    assert "1 of 4 files" in str(record[0].message)
    assert dataset.unverified == ("train-labels-idx1-ubyte.gz",)


def test_load_from_data_dir_accepts_uncompressed_files(tmp_path):
    arrays = tiny_split_arrays(seed=1)
    write_dataset_folder(tmp_path / "mnist", arrays, compress=False)
    with pytest.warns(DataWarning, match="uncompressed ones cannot match"):
        dataset = load_dataset("mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(dataset.train_labels.numpy(), arrays["train_labels"])
    assert dataset.unverified[0] == "train-images-idx3-ubyte"


def test_load_from_data_dir_missing_file_names_path(tmp_path):
    paths = write_dataset_folder(tmp_path / "mnist")
    paths["test_labels"].unlink()
    with pytest.raises(DataError) as caught:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(caught.value)
    assert str(paths["test_labels"]) in message
    assert "put the file there" in message and "--data-dir" in message
    assert str(paths["train_images"]) not in message  # only the missing one


def test_load_from_data_dir_never_uses_network(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("data_dir loading must not download")

    monkeypatch.setattr(datasets, "download_file", fail)
    with pytest.raises(DataError, match="missing"):
        load_dataset("kmnist", data_dir=tmp_path, download=True)


def test_data_dir_pointing_at_dataset_folder_gets_hint(tmp_path):
    write_dataset_folder(tmp_path / "mnist")
    with pytest.raises(DataError, match="folder that contains mnist/"):
        load_dataset("mnist", data_dir=tmp_path / "mnist")


@pytest.mark.parametrize("split", ["train", "test"])
def test_count_mismatch(tmp_path, split):
    arrays = tiny_split_arrays()
    arrays[f"{split}_labels"] = arrays[f"{split}_labels"][:-1]
    paths = write_dataset_folder(tmp_path / "mnist", arrays)
    with pytest.warns(DataWarning), pytest.raises(DataError, match="counts must agree") as caught:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(caught.value)
    assert str(paths[f"{split}_images"]) in message and str(paths[f"{split}_labels"]) in message


def test_label_out_of_range(tmp_path):
    arrays = tiny_split_arrays()
    arrays["test_labels"][2] = 10
    paths = write_dataset_folder(tmp_path / "mnist", arrays)
    with pytest.warns(DataWarning), pytest.raises(DataError, match="out of range") as caught:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(caught.value)
    assert str(paths["test_labels"]) in message
    assert "label 10 at index 2" in message and "[0, 10)" in message


@pytest.mark.parametrize(
    ("key", "array", "problem"),
    [
        ("train_images", np.zeros((TRAIN_COUNT, 784), dtype=np.uint8), "expected 3-D images"),
        ("test_labels", np.zeros((TEST_COUNT, 1), dtype=np.uint8), "expected 1-D labels"),
        ("train_images", np.zeros((TRAIN_COUNT, 32, 32), dtype=np.uint8), "are 32x32"),
    ],
    ids=["images-2d", "labels-2d", "size"],
)
def test_wrong_shapes(tmp_path, key, array, problem):
    arrays = tiny_split_arrays()
    arrays[key] = array
    paths = write_dataset_folder(tmp_path / "mnist", arrays)
    with pytest.warns(DataWarning), pytest.raises(DataError, match=problem) as caught:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(paths[key]) in str(caught.value)


def test_swapped_files_are_caught(tmp_path):
    arrays = tiny_split_arrays()
    arrays["train_images"], arrays["train_labels"] = arrays["train_labels"], arrays["train_images"]
    write_dataset_folder(tmp_path / "mnist", arrays)
    with pytest.warns(DataWarning), pytest.raises(DataError, match="expected 3-D images"):
        load_dataset("mnist", data_dir=tmp_path)


def test_corrupt_file_in_data_dir_names_path(tmp_path):
    paths = write_dataset_folder(tmp_path / "mnist")
    paths["test_images"].write_bytes(paths["test_images"].read_bytes()[:100])
    with pytest.warns(DataWarning), pytest.raises(DataError, match="corrupt gzip") as caught:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(paths["test_images"]) in str(caught.value)


# ----------------------------------------------------------------------------------------------
# download_file


def test_download_file_good(tmp_path, http_root):
    root, base = http_root
    payload = os.urandom(300_000)
    (root / "file.gz").write_bytes(payload)
    dest = tmp_path / "cache" / "mnist" / "file.gz"
    download_file(base + "file.gz", dest, hashlib.md5(payload).hexdigest(), progress=True)
    assert dest.read_bytes() == payload
    assert not dest.with_name("file.gz.part").exists()


def test_download_file_bad_checksum_deletes_partial(tmp_path, http_root):
    root, base = http_root
    (root / "file.gz").write_bytes(b"not the expected bytes")
    dest = tmp_path / "file.gz"
    with pytest.raises(DataError, match="wrong checksum") as caught:
        download_file(base + "file.gz", dest, "0" * 32, progress=False)
    message = str(caught.value)
    assert base + "file.gz" in message
    assert "0" * 32 in message and hashlib.md5(b"not the expected bytes").hexdigest() in message
    assert list(tmp_path.iterdir()) == [root]  # neither dest nor dest.part


def test_download_file_http_error(tmp_path, http_root):
    _, base = http_root
    with pytest.raises(DataError, match="HTTP 404") as caught:
        download_file(base + "missing.gz", tmp_path / "missing.gz", "0" * 32, progress=False)
    assert base + "missing.gz" in str(caught.value)
    assert not (tmp_path / "missing.gz.part").exists()


def test_download_file_connection_refused(tmp_path, dead_url):
    with pytest.raises(DataError, match="--data-dir") as caught:
        download_file(dead_url + "x.gz", tmp_path / "x.gz", "0" * 32, progress=False)
    assert dead_url + "x.gz" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_download_file_cleans_up_on_keyboard_interrupt(tmp_path, monkeypatch):
    class InterruptedResponse(io.BytesIO):
        headers = {"Content-Length": "2000000"}

        def read(self, size=-1):
            if self.tell() > 0:
                raise KeyboardInterrupt
            return super().read(size)

    monkeypatch.setattr(
        datasets.urllib.request,
        "urlopen",
        lambda request, timeout: InterruptedResponse(b"x" * 2_000_000),
    )
    dest = tmp_path / "file.gz"
    with pytest.raises(KeyboardInterrupt):
        download_file("http://127.0.0.1:9/file.gz", dest, "0" * 32, progress=True)
    assert list(tmp_path.iterdir()) == []


def test_download_file_short_body(tmp_path, monkeypatch):
    class ShortResponse(io.BytesIO):
        headers = {"Content-Length": "100"}

    monkeypatch.setattr(datasets.urllib.request, "urlopen", lambda request, timeout: ShortResponse(b"x" * 60))
    with pytest.raises(DataError, match="ended early"):
        download_file("http://127.0.0.1:9/f.gz", tmp_path / "f.gz", "0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Loading through the cache


def test_load_downloads_into_cache_with_mirror_fallback(tmp_path, http_root, dead_url, monkeypatch):
    root, base = http_root
    arrays = tiny_split_arrays(seed=3)
    write_dataset_folder(root, arrays)
    register_tiny(monkeypatch, root, mirrors=(dead_url, base))  # the first mirror is down
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = load_dataset("mnist", cache_dir=cache, progress=False)
    assert dataset.verified and dataset.source == cache / "mnist"
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(
        DATASETS["mnist"].files.values()
    )  # the four files, no .part left over
    np.testing.assert_array_equal(dataset.test_images.numpy(), arrays["test_images"])
    assert dataset_status("mnist", None, cache) == "cached"

    # With the server's copy gone and downloads off, the cache alone is enough.
    (root / "train-images-idx3-ubyte.gz").unlink()
    again = load_dataset("mnist", cache_dir=cache, download=False)
    assert torch.equal(again.train_images, dataset.train_images)


def test_corrupt_cached_file_is_downloaded_again(tmp_path, http_root, monkeypatch):
    root, base = http_root
    write_dataset_folder(root)
    register_tiny(monkeypatch, root, mirrors=(base,))
    cache = tmp_path / "cache"
    write_dataset_folder(cache / "mnist", tiny_split_arrays(seed=9))  # wrong content
    bad = cache / "mnist" / "train-labels-idx1-ubyte.gz"
    assert dataset_status("mnist", None, cache) == "cached, corrupt (will re-download)"

    with pytest.raises(DataError, match="corrupt") as caught:
        load_dataset("mnist", cache_dir=cache, download=False)
    assert str(cache / "mnist" / "train-images-idx3-ubyte.gz") in str(caught.value)

    dataset = load_dataset("mnist", cache_dir=cache, progress=False)
    assert dataset.verified
    assert bad.read_bytes() == (root / bad.name).read_bytes()


def test_missing_cache_without_download(tmp_path):
    with pytest.raises(DataError, match="downloading is disabled") as caught:
        load_dataset("fashion-mnist", cache_dir=tmp_path, download=False)
    message = str(caught.value)
    assert str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz") in message
    assert "--data-dir" in message


def test_all_mirrors_failing(tmp_path, http_root, dead_url, monkeypatch):
    root, base = http_root
    write_dataset_folder(root)
    register_tiny(monkeypatch, root, mirrors=(dead_url, base + "nowhere/"))
    with pytest.raises(DataError, match="from any mirror") as caught:
        load_dataset("mnist", cache_dir=tmp_path / "cache", progress=False)
    message = str(caught.value)
    assert dead_url in message and base + "nowhere/" in message
    assert "HTTP 404" in message and "--data-dir" in message
    assert not list((tmp_path / "cache" / "mnist").glob("*.part"))


def test_mirror_with_wrong_file_falls_back(tmp_path, http_root, monkeypatch):
    root, base = http_root
    write_dataset_folder(root / "good")
    write_dataset_folder(root / "stale", tiny_split_arrays(seed=5))
    register_tiny(monkeypatch, root / "good", mirrors=(base + "stale/", base + "good/"))
    dataset = load_dataset("mnist", cache_dir=tmp_path / "cache", progress=False)
    assert dataset.verified


# ----------------------------------------------------------------------------------------------
# dataset_status


def test_dataset_status(tmp_path, monkeypatch):
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    assert dataset_status("mnist", None, cache) == "not downloaded"
    assert dataset_status("mnist", data_dir, cache) == "missing from data dir (4 of 4 files)"

    paths = write_dataset_folder(data_dir / "mnist")
    assert dataset_status("mnist", data_dir, cache) == "local (data dir, checksums differ)"
    register_tiny(monkeypatch, data_dir / "mnist")
    assert dataset_status("mnist", data_dir, cache) == "local (data dir)"

    (cache / "mnist").mkdir(parents=True)
    (cache / "mnist" / paths["test_labels"].name).write_bytes(paths["test_labels"].read_bytes())
    assert dataset_status("mnist", None, cache) == "partly downloaded (1 of 4 files)"


# ----------------------------------------------------------------------------------------------
# The real data (CNNLAB_DATA_DIR=../shared/data in CI)


def _real_data_dir() -> Path:
    value = os.environ.get("CNNLAB_DATA_DIR")
    if not value:
        pytest.skip(reason="CNNLAB_DATA_DIR is not set; point it at shared/data to test the real files")
    return Path(value)


def test_real_mnist(recwarn):
    data_dir = _real_data_dir()
    info = DATASETS["mnist"]
    for key in ("test_images", "test_labels"):
        assert file_md5(data_dir / "mnist" / info.files[key]) == info.md5[key]

    dataset = load_dataset("mnist", data_dir=data_dir)
    warned = [w for w in recwarn if issubclass(w.category, DataWarning)]
    assert len(warned) == 1
    assert "t10k" not in str(warned[0].message)  # the test files verify; the partial train set not
    assert dataset.unverified == (info.files["train_images"], info.files["train_labels"])

    assert dataset.train_images.shape == (22_699, 28, 28)
    assert dataset.test_images.shape == (10_000, 28, 28)
    assert dataset.train_images.dtype == torch.uint8 and dataset.test_images.dtype == torch.uint8
    assert dataset.train_labels.shape == (22_699,) and dataset.test_labels.shape == (10_000,)
    assert set(dataset.train_labels.unique().tolist()) == set(range(10))
    assert set(dataset.test_labels.unique().tolist()) == set(range(10))
    assert int(dataset.train_images.max()) == 255


def test_real_fashion_mnist(recwarn):
    data_dir = _real_data_dir()
    dataset = load_dataset("fashion-mnist", data_dir=data_dir)
    assert len([w for w in recwarn if issubclass(w.category, DataWarning)]) == 1
    assert dataset.train_images.shape == (60_000, 28, 28)
    assert dataset.test_images.shape == (10_000, 28, 28)
    assert torch.bincount(dataset.test_labels).tolist() == [1000] * 10
