"""`PreprocessingConfig`: what a model's inputs must look like, recorded with its preset.

A preset's `config.json` holds a `preprocessing` block beside the model's kwargs:

    {"image_size": 224, "mean": [...], "std": [...], "interpolation": "bicubic",
     "resize_mode": "shortest", "context_length": 77, "max_image_pixels": 50000000,
     "max_text_bytes": 4096, "vocabulary": "assets/bpe_simple_vocab_16e6.txt.gz"}

`CLIP.save_to_preset` writes it and `CLIP.from_preset` reads it back into
`model.preprocessor_config`; the training input pipeline, the evaluations
(`model.image_preprocessor()`) and `export_saved_model` take their statistics,
sizes and limits from there, so a preset cannot be trained, evaluated and served
with different preprocessing. A preset written before the block existed (or
without some of its keys) loads with OpenAI's values, today's defaults.

`image_size`, `context_length` and `max_image_pixels` are also model kwargs; the
model's value is the one used (so `from_preset(path, image_size=...)` overrides
both), and the block repeats them for readers of the preset that do not build
the model.
"""
import dataclasses

from keras_clip.preprocessing.image_preprocessor import (DEFAULT_MAX_PIXELS, OPENAI_MEAN, OPENAI_STD,
                                                         validate_max_pixels)
from keras_clip.serving.protocol import DEFAULT_MAX_TEXT_BYTES

# The image resampling the preprocessing layer and the training augmentation
# implement (PIL-exact bicubic); a preset asking for another one is refused.
INTERPOLATIONS = ("bicubic",)
RESIZE_MODES = ("shortest",)
VOCABULARY_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCABULARY = f"assets/{VOCABULARY_FILE}"


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


def _triple(name, value, positive=False):
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or (positive and min(values) <= 0.0):
        kind = "3 positive numbers" if positive else "3 numbers"
        raise ValueError(f"`{name}` must be {kind} (R, G, B). Received: {name}={value!r}")
    return values


@dataclasses.dataclass(frozen=True)
class PreprocessingConfig:
    """The preprocessing a model was trained with (see the module docstring).

    Attributes:
        image_size: int, side of the square model input.
        mean: 3 floats, per-channel mean subtracted after scaling pixels to [0, 1].
        std: 3 positive floats, per-channel standard deviation divided by.
        interpolation: `"bicubic"` (PIL's, the only one implemented).
        resize_mode: `"shortest"`: resize the shortest side, then center crop.
        context_length: int, token positions.
        max_image_pixels: int, largest image (width x height) decoded and served.
        max_text_bytes: int, longest text (UTF-8 bytes) an export accepts.
        vocabulary: the BPE vocabulary, relative to the preset folder.

    Example:

    >>> config = PreprocessingConfig(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    >>> PreprocessingConfig.from_dict(config.to_dict()) == config
    True
    """

    image_size: int = 224
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    context_length: int = 77
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    vocabulary: str = VOCABULARY

    def __post_init__(self):
        _positive_int("image_size", self.image_size)
        if isinstance(self.context_length, bool) or not isinstance(self.context_length, int) \
                or self.context_length < 2:
            raise ValueError("`context_length` must be an integer >= 2. "
                             f"Received: context_length={self.context_length!r}")
        object.__setattr__(self, "mean", _triple("mean", self.mean))
        object.__setattr__(self, "std", _triple("std", self.std, positive=True))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"`interpolation` must be one of {INTERPOLATIONS}. "
                             f"Received: interpolation={self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}. "
                             f"Received: resize_mode={self.resize_mode!r}")
        validate_max_pixels(self.max_image_pixels, "max_image_pixels", image_size=self.image_size)
        _positive_int("max_text_bytes", self.max_text_bytes)
        if self.vocabulary != VOCABULARY:
            raise ValueError(f"`vocabulary` must be {VOCABULARY!r} (CLIP's BPE vocabulary, the only "
                             f"one the tokenizer implements). Received: vocabulary={self.vocabulary!r}")

    @classmethod
    def for_model(cls, model, **overrides):
        """The config of `model`'s own sizes and limit, with OpenAI's statistics
        unless `overrides` (any attribute) say otherwise."""
        values = dict(image_size=model.image_size, context_length=model.context_length,
                      max_image_pixels=model.max_image_pixels)
        return cls(**{**values, **overrides})

    @classmethod
    def from_dict(cls, block, **overrides):
        """The config of a preset's `preprocessing` block; missing keys (an older
        preset) take today's defaults, `overrides` win over the block.

        Raises:
            ValueError: an unknown key or a value out of range.
        """
        block = dict(block or {})
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(block) - names)
        if unknown:
            raise ValueError(f"Unknown keys in the preset's `preprocessing` block: {unknown}. "
                             f"Known: {sorted(names)}")
        return cls(**{**block, **overrides})

    def to_dict(self):
        """JSON-ready dict (lists for the statistics)."""
        values = dataclasses.asdict(self)
        values["mean"], values["std"] = list(self.mean), list(self.std)
        return values

    def image_preprocessor(self, **kwargs):
        """A `CLIPImagePreprocessor` with this config's size, statistics and limit."""
        from keras_clip.preprocessing.image_preprocessor import CLIPImagePreprocessor

        return CLIPImagePreprocessor(image_size=self.image_size, mean=self.mean, std=self.std,
                                     max_pixels=self.max_image_pixels, **kwargs)

    def tokenizer(self, **kwargs):
        """A `CLIPTokenizer` for this config's context length."""
        from keras_clip.preprocessing.tokenizer import CLIPTokenizer

        return CLIPTokenizer(context_length=self.context_length, **kwargs)
