"""keras_clip: CLIP for TensorFlow/Keras (models, training, export, serving)."""
from setuptools import find_packages, setup

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
        "tensorflow>=2.20,<2.22",
        "keras>=3.10,<4",
        "keras-hub>=0.20",
        "tensorflow-text>=2.20,<2.22",
        "tensorflow-datasets>=4.9",
        "tensorflow-serving-api>=2.20,<2.22",
        "tensorboard>=2.20",
        "absl-py>=2.0",
        "numpy",
        "safetensors>=0.4",
        "huggingface-hub>=0.20",
        "ftfy>=6.0",
    ],
    extras_require={
        # Reading PyTorch `.pt` checkpoints (OpenAI, open_clip). safetensors and
        # Hugging Face folders need no torch.
        "torch": ["torch>=2.1"],
        "keras_hub": ["keras-hub>=0.20"],  # keras_clip.convert.keras_hub_converter only
        "test": [
            "pytest>=8",
            "pillow",
            # Reference implementations for parity tests. torch is pinned so pip
            # takes the local CPU build instead of a multi-GB CUDA wheel.
            "torch==2.13.0",
            "open-clip-torch==3.3.0",
            "transformers>=4.40",
        ],
    },
)
