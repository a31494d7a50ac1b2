"""keras_clip: CLIP (Radford et al., 2021) for TensorFlow/Keras."""
import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from keras_clip.convert.checkpoint import CheckpointError  # noqa: E402
from keras_clip.models.clip import CLIP  # noqa: E402
from keras_clip.models.modified_resnet import CLIPModifiedResNet  # noqa: E402
from keras_clip.models.text_transformer import CLIPTextTransformer  # noqa: E402
from keras_clip.models.vision_transformer import CLIPVisionTransformer  # noqa: E402
from keras_clip.presets import list_presets  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):
    # Preprocessing imports tensorflow_text; load it only when asked for.
    if name in ("CLIPTokenizer", "tokenize"):
        from keras_clip.preprocessing import tokenizer

        return getattr(tokenizer, name)
    if name == "CLIPImagePreprocessor":
        from keras_clip.preprocessing.image_preprocessor import CLIPImagePreprocessor

        return CLIPImagePreprocessor
    raise AttributeError(f"module 'keras_clip' has no attribute {name!r}")
