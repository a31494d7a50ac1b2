"""keras_clip: CLIP for TensorFlow/Keras (models, training, export, serving).

Every third-party module the package imports is declared here: in `install_requires`
when training, export, serving or checkpoint reading needs it, else in a named extra
whose absence gives an error naming the extra (`keras_clip/optional.py`).
"""
from setuptools import find_packages, setup

# Reading plain PyTorch `.pt` checkpoints (open_clip; `torch.load(weights_only=True)`).
# safetensors, Hugging Face folders and OpenAI's TorchScript archives (read by
# keras_clip's own restricted unpickler) need no torch.
# torch >= 2.10.0: older releases have published ways to run code through
# torch.load(weights_only=True), the only torch call keras_clip makes on downloaded
# files: CVE-2025-32434 (GHSA-53q9-r3pm-6pq6, torch <= 2.5.1, fixed in 2.6.0) and
# CVE-2026-24747 (GHSA-63cw-57p8-fm3p, memory corruption in the weights_only
# unpickler, torch <= 2.9.1, fixed in 2.10.0). Keep equal to
# keras_clip.convert.checkpoint.MIN_TORCH_VERSION, which read_state_dict enforces.
TORCH = ["torch>=2.10.0"]
# Converting to and from keras-hub's CLIPBackbone (keras_clip.convert.keras_hub_converter).
KERAS_HUB = ["keras-hub>=0.20"]
# Evaluation reports: PNG plots (matplotlib) and the linear probe's L-BFGS fit (scipy).
EVAL = ["matplotlib>=3.7", "scipy>=1.10"]

setup(
    name="keras_clip",
    version="0.1.0",
    description="CLIP in Keras 3: paper architectures, reference-parity checkpoints, "
    "contrastive training, TF Serving export.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["keras_clip", "keras_clip.*"]),
    package_data={"keras_clip": ["assets/*"], "keras_clip.zero_shot_data": ["*.json", "README.md"]},
    install_requires=[
        # 2.20 is the first release whose tf-text ops TF Serving 2.20 links; the
        # exported graphs and the MultiWorkerMirroredStrategy loop are tested on 2.21.
        "tensorflow>=2.20,<2.22",
        "tensorflow-text>=2.20,<2.22",
        "tensorflow-serving-api>=2.20,<2.22",
        # Keras 3 with the TF backend (keras.ops, ExportArchive, weights.h5 presets).
        "keras>=3.10,<4",
        "tensorflow-datasets>=4.9",
        "absl-py>=2.0",
        # tf.summary (training's TensorBoard logs) needs it; tensorflow does not install it.
        "tensorboard>=2.20",
        "numpy>=1.26",
        "grpcio>=1.60",  # serving/ client and local PredictionService
        "protobuf>=4.25",  # TF Serving request/response messages
        "safetensors>=0.4",  # open_clip / Hugging Face weights without pickles
        "huggingface-hub>=0.20",  # named weight presets
        "ftfy>=6.0",  # OpenAI's text cleaning in `tokenize()`
    ],
    extras_require={
        "torch": TORCH,
        "eval": EVAL,
        "keras_hub": KERAS_HUB,
        "test": [
            "pytest>=8",
            # Two test processes (pytest.ini: -n 2, a file per process): most tests
            # trace graphs in one Python thread, so a second process halves the suite.
            "pytest-xdist>=3.8",  # --no-loadscope-reorder
            "pillow>=10",
            "psutil>=5.9",
            # Reference implementations for parity tests. torch is pinned so pip
            # takes the local CPU build instead of a multi-GB CUDA wheel.
            "torch==2.13.0",
            "open-clip-torch==3.3.0",
            "transformers>=4.40",
        ] + EVAL + KERAS_HUB,
    },
)
