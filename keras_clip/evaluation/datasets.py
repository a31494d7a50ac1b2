"""Labelled image datasets for classification evaluation, streamed in batches.

`load_classification_dataset(spec)` accepts:

- `tfds:NAME` or `tfds:NAME/SPLIT` (e.g. `tfds:cifar10/test`): a TensorFlow Datasets
  builder already prepared under `data_dir`; nothing is downloaded.
- a CSV file (or a folder holding `labels.csv`) with columns `path` and `label`
  (an optional `class_name` column names the classes); paths are relative to the
  CSV's folder. The shared CIFAR-10 test folder is in this form.
- a folder of MNIST-style IDX files (`*images-idx3-ubyte[.gz]` and
  `*labels-idx1-ubyte[.gz]`); grey images are repeated to three channels.
- a folder with one sub-folder of images per class (class names are the sorted
  sub-folder names).

In every form a `classes.txt` next to the data (one name per line, label order)
overrides the class names. Images come out as encoded bytes (files) or uint8
`(H, W, 3)` arrays (IDX, TFDS), which is what
`keras_clip.evaluation.encode_images` accepts.
"""
import csv
import glob
import gzip
import hashlib
import os

import numpy as np
from absl import logging

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class LabelledImages:
    """A labelled image dataset that reads its images batch by batch.

    Args:
        name: str, a short name used in reports.
        class_names: list of C str; label `i` names class `class_names[i]`.
        labels: int64 `(N,)`.
        read_images: callable `indices -> images` returning a list of encoded
            bytes or a uint8 array `(n, H, W, 3)` for the given example indices.
        fingerprint: str identifying the source and the selected examples
            (used as part of embedding cache keys).

    Example:

    >>> data = load_classification_dataset("/data/cifar10_test", max_examples=100)
    >>> for images, labels in data.batches(32): ...
    """

    def __init__(self, name, class_names, labels, read_images, fingerprint):
        self.name = name
        self.class_names = list(class_names)
        self.labels = np.asarray(labels, np.int64)
        self._read_images = read_images
        self.fingerprint = fingerprint
        num_classes = len(self.class_names)
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            raise ValueError(
                f"Labels must lie in [0, {len(self.class_names)}). Received: "
                f"min={self.labels.min()}, max={self.labels.max()}"
            )

    def __len__(self):
        return len(self.labels)

    @property
    def num_classes(self):
        return len(self.class_names)

    def batches(self, batch_size=64):
        """Yields `(images, labels)` for consecutive batches of at most `batch_size`."""
        if batch_size <= 0:
            raise ValueError(f"`batch_size` must be positive. Received: batch_size={batch_size}")
        for start in range(0, len(self), batch_size):
            indices = np.arange(start, min(start + batch_size, len(self)))
            yield self._read_images(indices), self.labels[indices]

    def subset(self, indices, name=None):
        """A new dataset holding examples `indices` (in that order) of this one."""
        indices = np.asarray(indices, np.int64)
        read = self._read_images
        digest = hashlib.sha256(indices.tobytes()).hexdigest()[:16]
        return LabelledImages(
            name or self.name, self.class_names, self.labels[indices],
            lambda i: read(indices[i]), f"{self.fingerprint}|subset:{digest}",
        )


def _read_class_names_file(folder):
    path = os.path.join(folder, "classes.txt")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _select(num, max_examples, seed):
    """Indices of the examples kept: all, or a seeded random subset in file order.

    Files such as CIFAR-10's labels.csv are sorted by class, so the first
    `max_examples` rows would hold only one class; a random subset keeps the class mix.
    """
    if not max_examples or max_examples >= num:
        return np.arange(num)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num, size=max_examples, replace=False))


def _file_reader(paths):
    def read(indices):
        images = []
        for i in indices:
            with open(paths[i], "rb") as f:
                images.append(f.read())
        return images

    return read


def _load_csv(csv_path, max_examples, seed):
    folder = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0] or "label" not in rows[0]:
        raise ValueError(
            f"A labels CSV needs `path` and `label` columns. Received: {csv_path}"
        )
    labels = np.array([int(r["label"]) for r in rows], np.int64)
    class_names = _read_class_names_file(folder)
    if class_names is None:
        if "class_name" in rows[0]:
            names = {int(r["label"]): r["class_name"] for r in rows}
            class_names = [names.get(i, str(i)) for i in range(labels.max() + 1)]
        else:
            class_names = [str(i) for i in range(labels.max() + 1)]
    keep = _select(len(rows), max_examples, seed)
    paths = [os.path.join(folder, rows[i]["path"]) for i in keep]
    return class_names, labels[keep], _file_reader(paths), keep


def _load_image_folder(folder, max_examples, seed):
    subfolders = sorted(
        d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))
    )
    class_names = _read_class_names_file(folder) or subfolders
    paths, labels = [], []
    for name in subfolders:
        if name not in class_names:
            raise ValueError(f"Sub-folder {name!r} is not listed in classes.txt of {folder}")
        label = class_names.index(name)
        for file in sorted(os.listdir(os.path.join(folder, name))):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(folder, name, file))
                labels.append(label)
    if not paths:
        raise ValueError(f"No images found in class sub-folders of {folder}")
    keep = _select(len(paths), max_examples, seed)
    return (class_names, np.array(labels, np.int64)[keep],
            _file_reader([paths[i] for i in keep]), keep)


def read_idx(path):
    """Reads an IDX file (optionally gzipped) into a numpy array of its stored type."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"Not an IDX file (bad magic number): {path}")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    dtype, ndim = np.dtype(dtypes[data[2]]), data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(shape)


def _load_idx_folder(folder, max_examples, seed):
    image_files = sorted(glob.glob(os.path.join(folder, "*images-idx3-ubyte*")))
    label_files = sorted(glob.glob(os.path.join(folder, "*labels-idx1-ubyte*")))
    if len(image_files) != 1 or len(label_files) != 1:
        raise ValueError(
            f"Expected one `*images-idx3-ubyte` and one `*labels-idx1-ubyte` file in "
            f"{folder}. Received: {image_files + label_files}"
        )
    labels = read_idx(label_files[0]).astype(np.int64)  # (N,)
    images = read_idx(image_files[0])  # (N, H, W) uint8
    class_names = _read_class_names_file(folder) or [str(i) for i in range(labels.max() + 1)]
    keep = _select(len(labels), max_examples, seed)

    def read(indices):
        grey = images[keep[indices]]  # (n, H, W)
        return np.repeat(grey[..., None], 3, axis=-1)  # (n, H, W, 3)

    return class_names, labels[keep], read, keep


def _load_tfds(spec, data_dir, max_examples):
    import tensorflow_datasets as tfds

    from keras_clip.data.spec import DataSpec

    parsed = DataSpec.parse(spec, image_root=data_dir or "", default_split="test")
    name, split = parsed.path, parsed.split
    builder = tfds.builder(name, data_dir=data_dir)
    if max_examples:
        split = f"{split}[:{int(max_examples)}]"
    # Labels are read in one pass without decoding images; images are decoded per batch.
    # `as_dataset` never downloads; it fails if the data were not prepared.
    try:
        dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        undecoded = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False,
                                       decoders={"image": tfds.decode.SkipDecoding()})
    except AssertionError as error:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared under data_dir={data_dir!r}; "
            "keras_clip does not download it (run `tfds build` first)."
        ) from error
    labels = np.array([int(y) for y in undecoded.map(lambda x, y: y).as_numpy_iterator()])
    class_names = builder.info.features["label"].names

    state = {"iterator": None, "position": 0}

    def read(indices):
        # Consecutive batches continue one iterator; any other request restarts it.
        start, stop = int(indices[0]), int(indices[-1]) + 1
        if not np.array_equal(indices, np.arange(start, stop)):
            raise NotImplementedError("TFDS datasets are read in contiguous batches only.")
        if state["iterator"] is None or state["position"] != start:
            state["iterator"] = dataset.skip(start).map(lambda x, y: x).as_numpy_iterator()
        images = np.stack([next(state["iterator"]) for _ in range(stop - start)])
        state["position"] = stop
        return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images

    return class_names, labels, read, f"{name}/{split}|{data_dir}"


def load_classification_dataset(spec, data_dir=None, max_examples=None, seed=0):
    """Loads a labelled image dataset (see the module docstring for the forms of `spec`).

    Args:
        spec: str, `tfds:NAME[/SPLIT]`, a CSV path, or a folder.
        data_dir: TFDS data folder (TFDS only).
        max_examples: optional int; keep a seeded random subset of this many
            examples (file order preserved). For TFDS, the first this many.
        seed: int, seed of the subset.

    Returns:
        A `LabelledImages`.

    Raises:
        ValueError: for a spec that matches none of the supported forms.
    """
    spec = str(spec)
    if spec.startswith("tfds:"):
        class_names, labels, read, source = _load_tfds(spec, data_dir, max_examples)
        name = spec[len("tfds:"):]
        fingerprint = f"tfds:{source}"
        return LabelledImages(name, class_names, labels, read, fingerprint)
    path = os.path.abspath(spec)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "labels.csv")):
        path = os.path.join(path, "labels.csv")
    if os.path.isfile(path) and path.endswith(".csv"):
        loader, kind = _load_csv, "csv"
    elif os.path.isdir(path) and glob.glob(os.path.join(path, "*idx1-ubyte*")):
        loader, kind = _load_idx_folder, "idx"
    elif os.path.isdir(path):
        loader, kind = _load_image_folder, "folder"
    else:
        raise ValueError(
            "`spec` must be `tfds:NAME`, a labels CSV, an IDX folder or a folder of class "
            f"sub-folders. Received: spec={spec!r}"
        )
    class_names, labels, read, keep = loader(path, max_examples, seed)
    stat = os.stat(path)
    digest = hashlib.sha256(np.asarray(keep, np.int64).tobytes()).hexdigest()[:16]
    fingerprint = f"{kind}:{path}|mtime:{stat.st_mtime_ns}|keep:{len(keep)}:{digest}"
    name = os.path.basename(os.path.dirname(path) if kind == "csv" else path.rstrip("/"))
    logging.info("Loaded %s dataset %s: %d examples, %d classes.", kind, name, len(labels),
                 len(class_names))
    return LabelledImages(name, class_names, labels, read, fingerprint)


def split_indices(labels, fractions, seed=0):
    """Stratified random split of example indices into parts with the given fractions.

    Every class is shuffled and cut at the same fractions, so each part keeps the
    class mix. The parts are disjoint and cover all examples.

    Args:
        labels: int `(N,)`.
        fractions: sequence of positive floats summing to 1.
        seed: int.

    Returns:
        list of sorted int64 index arrays, one per fraction.
    """
    fractions = np.asarray(fractions, np.float64)
    if np.any(fractions <= 0) or abs(fractions.sum() - 1) > 1e-6:
        raise ValueError(f"`fractions` must be positive and sum to 1. Received: {fractions}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    parts = [[] for _ in fractions]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.round(np.cumsum(fractions)[:-1] * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts)):
            part.extend(chunk.tolist())
    return [np.sort(np.array(p, np.int64)) for p in parts]
