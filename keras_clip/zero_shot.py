"""Zero-shot classification: class embeddings from prompt templates, and a classifier.

CLIP classifies an image by comparing its embedding with the text embeddings of
one prompt per class ("a photo of a {class}."). Radford et al. (2021, section 3.1.4)
improve on a single prompt by *ensembling in embedding space*: every class name
is put into many templates, each prompt is encoded and L2-normalised, the
normalised embeddings of a class are averaged and the mean is normalised again.
`build_class_embeddings` does exactly that, as OpenAI's ImageNet notebook and
open_clip's `build_zero_shot_classifier` do (tests check parity to 1e-5).

Class names and OpenAI's templates for ImageNet, CIFAR, Food-101, ... ship with
the package: see `keras_clip.zero_shot_data.load_dataset_prompts`.
"""
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from keras import ops

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def resolve_templates(templates):
    """Prompt templates from None, a sequence, a text file or a shipped dataset name.

    Args:
        templates: None or "" (the default single template `"a photo of a {}."`),
            a sequence of templates (returned as a list), a path to a UTF-8 text
            file (one template per non-blank line), or a
            `keras_clip.zero_shot_data` dataset name (`"imagenet"`, `"cifar10"`).

    Returns:
        list of templates.
    """
    if templates is None or (isinstance(templates, str) and not templates):
        return list(DEFAULT_TEMPLATES)
    if not isinstance(templates, str):
        return list(templates)
    if os.path.isfile(templates):
        with open(templates, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    from keras_clip.zero_shot_data import load_dataset_prompts

    return load_dataset_prompts(templates)[1]


def class_logits(clip_model, image_embeddings, class_embeddings):
    """Zero-shot logits: `logit_scale * image_embeddings @ class_embeddings.T` (float32).

    The one definition of the classification head, used by `ZeroShotClassifier`
    and the exported `classify` signature. For a model trained with the sigmoid
    loss the learned bias is added (the sigmoid's input; a softmax over the
    classes is unchanged by it).

    Args:
        clip_model: a `keras_clip.CLIP`.
        image_embeddings: float `(B, E)`, unit norm.
        class_embeddings: float32 `(C, E)`, unit-norm rows.

    Returns:
        float32 logits `(B, C)`.
    """
    image_embeddings = ops.cast(image_embeddings, "float32")  # (B, E)
    scale = ops.cast(clip_model.logit_scale(), "float32")
    logits = scale * ops.matmul(image_embeddings, ops.transpose(class_embeddings))  # (B, C)
    if uses_sigmoid_loss(clip_model):
        logits = logits + ops.cast(clip_model.logit_bias(), "float32")
    return logits


def uses_sigmoid_loss(clip_model):
    """Whether `clip_model` was trained with the sigmoid (SigLIP) loss."""
    return getattr(clip_model, "contrastive_loss", "softmax") == "sigmoid"


def fill_templates(class_names, templates):
    """All prompts, class-major: `[t(c) for c in class_names for t in templates]`.

    Args:
        class_names: sequence of str.
        templates: sequence of `str.format` strings with one `{}` (for example
            `"a photo of a {}."`), or of callables mapping a class name to a str
            (open_clip's style), or a mix of both.

    Returns:
        list of `len(class_names) * len(templates)` str; prompt `c * T + t` is
        template `t` filled with class `c`.
    """
    prompts = []
    for name in class_names:
        for template in templates:
            prompts.append(template(name) if callable(template) else template.format(name))
    return prompts


def _validate(class_names, templates):
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(
            "`class_names` must be a non-empty sequence of str. "
            f"Received: class_names={class_names!r}"
        )
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError(
            "`templates` must be a non-empty sequence of format strings or callables. "
            f"Received: templates={templates!r}"
        )
    for template in templates:
        if not callable(template) and "{}" not in template:
            raise ValueError(
                "Every template must contain `{}` (replaced by the class name) or be "
                f"callable. Received: template={template!r}"
            )


def build_class_embeddings(model, class_names, templates=DEFAULT_TEMPLATES, batch_size=256,
                           tokenizer=None):
    """Zero-shot class embeddings by prompt ensembling (the paper's section 3.1.4).

    For class `c`: `w_c = normalize(mean_t normalize(encode_text(template_t(c))))`.
    All `C * T` prompts are tokenised once and encoded in batches of `batch_size`,
    whatever class they belong to.

    Args:
        model: a `keras_clip.CLIP` (anything with `encode_text(token_ids)` and
            `context_length` works).
        class_names: sequence of C str.
        templates: sequence of T format strings (with `{}`) or callables
            `name -> str`. Defaults to `("a photo of a {}.",)`.
        batch_size: int, prompts per `encode_text` call.
        tokenizer: optional callable `list of str -> int (N, context_length)`.
            Defaults to `keras_clip.tokenize` at the model's context length, which
            gives exactly `open_clip.tokenize`'s ids (the in-graph
            `model.tokenizer()` layer gives the same ids on clean text).

    Returns:
        float32 numpy array `(C, E)`, unit-norm rows.

    Raises:
        ValueError: for empty class names or templates, a template without `{}`,
            or a non-positive `batch_size`.

    Example:

    >>> model = keras_clip.CLIP.from_preset("clip_vit_tiny")
    >>> build_class_embeddings(model, ["cat", "dog"], ["a photo of a {}.", "a {}."]).shape
    (2, 256)
    """
    _validate(class_names, templates)
    if batch_size <= 0:
        raise ValueError(f"`batch_size` must be positive. Received: batch_size={batch_size}")
    if tokenizer is None:
        from keras_clip.preprocessing.tokenizer import tokenize

        def tokenizer(texts):
            return tokenize(texts, context_length=model.context_length)

    prompts = fill_templates(class_names, templates)
    num_classes, num_templates = len(class_names), len(templates)
    logging.info(
        "Encoding %d zero-shot prompts (%d classes x %d templates).",
        len(prompts), num_classes, num_templates,
    )
    chunks = []
    for start in range(0, len(prompts), batch_size):
        token_ids = tokenizer(prompts[start : start + batch_size])  # (n, T_ctx)
        features = model.encode_text(token_ids, normalize=False, trim=True)  # (n, E)
        chunks.append(np.asarray(ops.convert_to_numpy(features), np.float32))
    features = np.concatenate(chunks, axis=0)  # (C * T, E)
    # Per-prompt normalisation, mean over templates, renormalisation, all in float32
    # and in the reference's order of operations.
    features = features / np.linalg.norm(features, axis=-1, keepdims=True)
    features = features.reshape(num_classes, num_templates, -1).mean(axis=1)  # (C, E)
    return (features / np.linalg.norm(features, axis=-1, keepdims=True)).astype(np.float32)


def checked_class_embeddings(class_embeddings, class_names, clip_model):
    """`class_embeddings` as a float32 array, or a ValueError unless its shape is
    `(len(class_names), clip_model.embed_dim)` (shared by `ZeroShotClassifier` and the
    exported `classify` signature)."""
    class_embeddings = np.asarray(class_embeddings, np.float32)
    expected = (len(class_names), clip_model.embed_dim)
    if class_embeddings.shape != expected:
        raise ValueError(
            f"`class_embeddings` must have shape {expected} (classes, embed_dim). "
            f"Received: shape={class_embeddings.shape}"
        )
    return class_embeddings


@keras.saving.register_keras_serializable(package="keras_clip")
class ZeroShotClassifier(keras.Model):
    """A CLIP image tower with a fixed head of class text embeddings.

    `probabilities = softmax(logit_scale * normalize(encode_image(x)) @ W.T)` where
    row `c` of `W` is the prompt-ensembled embedding of class `c`
    (`build_class_embeddings`). `W` is a non-trainable weight (`class_embeddings`),
    so the classifier saves, reloads and exports as one model; the text tower is
    only needed to build it.

    Differences from the references: the softmax temperature is the model's learned
    `logit_scale` (the paper's zero-shot formulation); open_clip's evaluation script
    multiplies by a fixed 100 instead. Arg-max predictions are identical.

    Args:
        clip_model: a `keras_clip.CLIP`.
        class_names: sequence of C str, class `i` is label `i`.
        templates: sequence of format strings (with `{}`) or callables. Only
            strings are kept in `get_config`. Defaults to `("a photo of a {}.",)`.
        class_embeddings: optional float array `(C, E)` to use instead of encoding
            the prompts (for example precomputed with `build_class_embeddings`).
        batch_size: int, prompts per text-encoder call when building.
        **kwargs: standard `keras.Model` arguments (`name`, ...).

    Call arguments:
        images: float `(B, S, S, 3)` preprocessed as `CLIPImagePreprocessor` does;
            or encoded images (`tf.string`, shape `(B,)`) or uint8 pixels
            `(B, H, W, 3)`, which are run through the model's
            `image_preprocessor()` first.

    Returns:
        float32 class probabilities `(B, C)`.

    Example:

    >>> model = keras_clip.CLIP.from_preset("clip_vit_tiny")
    >>> classifier = ZeroShotClassifier(model, ["cat", "dog"])
    >>> classifier(np.zeros((3, 64, 64, 3), "float32")).shape
    TensorShape([3, 2])
    """

    def __init__(self, clip_model, class_names, templates=DEFAULT_TEMPLATES,
                 class_embeddings=None, batch_size=256, **kwargs):
        super().__init__(**kwargs)
        _validate(class_names, templates)
        self.clip_model = clip_model
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.batch_size = batch_size
        self.image_preprocessor = clip_model.image_preprocessor()
        if class_embeddings is None:
            class_embeddings = build_class_embeddings(
                clip_model, self.class_names, self.templates, batch_size=batch_size
            )
        class_embeddings = checked_class_embeddings(class_embeddings, self.class_names, clip_model)
        self.class_embeddings = self.add_weight(
            shape=class_embeddings.shape,
            initializer=keras.initializers.Constant(class_embeddings),
            trainable=False,
            dtype="float32",
            name="class_embeddings",
        )
        # Encoded images arrive as tf.string, which Keras must not convert to floats.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.built = True

    def _preprocess(self, images):
        images = tf.convert_to_tensor(images)
        if images.dtype == tf.string or images.dtype.is_integer:
            return self.image_preprocessor(images)  # (B, S, S, 3)
        return images

    def compute_logits(self, images, training=False):
        """Scaled cosine similarities `(B, C)` (the softmax's input); for a model trained
        with the sigmoid loss, plus its learned bias (the sigmoid's input)."""
        image_embeddings = self.clip_model.encode_image(
            self._preprocess(images), training=training
        )  # (B, E), unit norm
        return class_logits(self.clip_model, image_embeddings, self.class_embeddings)  # (B, C)

    def call(self, images, training=False):
        logits = self.compute_logits(images, training=training)  # (B, C)
        if uses_sigmoid_loss(self.clip_model):
            # SigLIP: each class is an independent yes/no; rows need not sum to 1.
            return ops.sigmoid(logits)
        return ops.softmax(logits, axis=-1)

    def predict_labels(self, images, batch_size=None):
        """Arg-max class indices, int64 numpy `(B,)`, computed in batches.

        Args:
            images: as for `call`.
            batch_size: optional int; images per forward pass (all at once if None).
        """
        if not batch_size or len(images) <= batch_size:
            return np.argmax(ops.convert_to_numpy(self.compute_logits(images)), axis=-1)
        labels = [
            np.argmax(ops.convert_to_numpy(self.compute_logits(images[i : i + batch_size])), axis=-1)
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(labels)

    def get_config(self):
        if any(callable(t) for t in self.templates):
            raise NotImplementedError(
                "A ZeroShotClassifier built from callable templates cannot be "
                "serialised; pass format strings such as 'a photo of a {}.'."
            )
        config = super().get_config()
        config.update(
            {
                "clip_model": keras.saving.serialize_keras_object(self.clip_model),
                "class_names": self.class_names,
                "templates": self.templates,
                "batch_size": self.batch_size,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        """Rebuilds the architecture; class embeddings are zeros until weights load.

        Like the CLIP model it wraps, a classifier from a config alone has no
        trained weights: `keras.models.load_model` (or `set_weights`) restores
        them, including `class_embeddings`, so the prompts are not re-encoded.
        """
        config = dict(config)
        clip_model = keras.saving.deserialize_keras_object(config.pop("clip_model"))
        placeholder = np.zeros((len(config["class_names"]), clip_model.embed_dim), np.float32)
        return cls(clip_model, class_embeddings=placeholder, **config)
