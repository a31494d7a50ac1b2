"""Converting between keras_clip's `CLIP` (ViT) and keras-hub's `CLIPBackbone`.

Both are Keras 3 models with the same computation, so the conversion pairs variables
one to one (`_variable_pairs`) and reshapes attention projections: keras_clip packs
q, k, v into one `(D, 3D)` kernel as OpenAI does; keras-hub uses Keras'
`MultiHeadAttention` with `(D, heads, head_dim)` kernels. The same pairing serves
both directions, so a round trip returns identical weights.

keras-hub is an optional dependency (`pip install 'keras_clip[keras_hub]'`), imported
only here.

Where keras-hub differs from OpenAI's CLIP (and from keras_clip), see
docs/moving_models.md:
* its text tower's final LayerNorm uses epsilon 1e-6 (OpenAI: 1e-5), fixed in
  keras-hub's code, so text embeddings differ by about 1e-7 (measured);
* its text pooler takes `argmax(token_ids)`, which is the end token only while the
  end token is the highest id in the vocabulary (true for OpenAI's 49,408 tokens);
* its `CLIPPreprocessor` cleans text with NFC + whitespace + lowercase (OpenAI's
  tokenizer also runs ftfy and HTML unescaping) and its `CLIPImageConverter`
  center-crops to a square and then resizes with TensorFlow's bicubic kernel
  (OpenAI: PIL bicubic resize of the short side, then center crop).
"""
import os

import numpy as np

from keras_clip.layers.activations import ACTIVATIONS
from keras_clip.optional import import_optional

def import_keras_hub():
    """Imports keras-hub, or raises an ImportError that says how to install it."""
    return import_optional("keras_hub", "Converting to or from keras-hub")


def _check_convertible(model):
    if model.contrastive_loss == "sigmoid":
        raise ValueError(
            "keras-hub's CLIPBackbone has no `logit_bias`, so a model trained with the "
            "sigmoid loss cannot be converted; write format='open_clip' or 'openai'. "
            f"Received: loss={model.contrastive_loss!r}")
    if model.vision_architecture != "vit":
        raise ValueError(
            "keras-hub's CLIPBackbone has a ViT image tower only; it cannot hold a "
            f"modified ResNet. Received: vision_architecture={model.vision_architecture!r}"
        )
    if model.layer_norm_epsilon != 1e-5:
        raise ValueError(
            "keras-hub's CLIP layers use LayerNorm epsilon 1e-5 and cannot take another "
            f"value. Received: layer_norm_epsilon={model.layer_norm_epsilon}"
        )
    if model.end_token_id != model.vocabulary_size - 1:
        raise ValueError(
            "keras-hub pools text at argmax(token_ids), so the end token must be the "
            f"highest id. Received: end_token_id={model.end_token_id}, "
            f"vocabulary_size={model.vocabulary_size}"
        )


def backbone_kwargs(model):
    """keras-hub encoder/backbone kwargs equivalent to a keras_clip ViT `CLIP`."""
    return dict(
        vision=dict(
            patch_size=model.vision_patch_size,
            hidden_dim=model.vision_hidden_dim,
            num_layers=model.vision_num_layers,
            num_heads=model.vision_num_heads,
            intermediate_dim=model.vision_intermediate_dim or 4 * model.vision_hidden_dim,
            intermediate_activation=model.activation,
            image_shape=(model.image_size, model.image_size, 3),
        ),
        text=dict(
            vocabulary_size=model.vocabulary_size,
            embedding_dim=model.text_hidden_dim,
            hidden_dim=model.text_hidden_dim,
            num_layers=model.text_num_layers,
            num_heads=model.text_num_heads,
            intermediate_dim=model.text_intermediate_dim or 4 * model.text_hidden_dim,
            intermediate_activation=model.activation,
            max_sequence_length=model.context_length,
        ),
        projection_dim=model.embed_dim,
    )


def clip_kwargs(backbone):
    """keras_clip `CLIP` kwargs from a keras-hub `CLIPBackbone`."""
    vision, text = backbone.vision_encoder, backbone.text_encoder
    activations = {vision.intermediate_activation, text.intermediate_activation}
    if len(activations) != 1 or not activations <= set(ACTIVATIONS):
        raise ValueError(
            f"keras_clip supports the activations {ACTIVATIONS} (the same in both towers). "
            f"Received: vision {vision.intermediate_activation!r}, text "
            f"{text.intermediate_activation!r}"
        )
    if text.embedding_dim != text.hidden_dim:
        raise ValueError(
            "keras_clip's text tower has embedding_dim == hidden_dim. Received: "
            f"embedding_dim={text.embedding_dim}, hidden_dim={text.hidden_dim}"
        )
    image_shape = tuple(vision.image_shape)
    return dict(
        embed_dim=backbone.projection_dim,
        image_size=int(image_shape[0]),
        vision_architecture="vit",
        vision_patch_size=vision.patch_size,
        vision_hidden_dim=vision.hidden_dim,
        vision_num_layers=vision.num_layers,
        vision_num_heads=vision.num_heads,
        vision_intermediate_dim=vision.intermediate_dim,
        context_length=text.max_sequence_length,
        vocabulary_size=text.vocabulary_size,
        text_hidden_dim=text.hidden_dim,
        text_num_layers=text.num_layers,
        text_num_heads=text.num_heads,
        text_intermediate_dim=text.intermediate_dim,
        activation=activations.pop(),
        end_token_id=text.vocabulary_size - 1,
    )


def _identity(x):
    return x


def _block_pairs(ours, theirs, num_heads):
    """(keras_clip variable, keras-hub variable, to_hub, from_hub) for one block."""
    hidden = ours.ln_1.gamma.shape[0]
    head_dim = hidden // num_heads
    att = theirs.attention
    pairs = [
        (ours.ln_1.gamma, theirs.layer_norm_1.gamma, _identity, _identity),
        (ours.ln_1.beta, theirs.layer_norm_1.beta, _identity, _identity),
        (ours.ln_2.gamma, theirs.layer_norm_2.gamma, _identity, _identity),
        (ours.ln_2.beta, theirs.layer_norm_2.beta, _identity, _identity),
        (ours.c_fc.kernel, theirs.dense_1.kernel, _identity, _identity),
        (ours.c_fc.bias, theirs.dense_1.bias, _identity, _identity),
        (ours.c_proj.kernel, theirs.dense_2.kernel, _identity, _identity),
        (ours.c_proj.bias, theirs.dense_2.bias, _identity, _identity),
        # out_proj (D, D) <-> output_dense (H, Dh, D)
        (ours.attn.out_proj.kernel, att.output_dense.kernel,
         lambda w: w.reshape(num_heads, head_dim, hidden), lambda w: w.reshape(hidden, hidden)),
        (ours.attn.out_proj.bias, att.output_dense.bias, _identity, _identity),
    ]
    # qkv kernel (D, 3D) = [q | k | v] <-> three (D, H, Dh) kernels; bias (3D,) <-> (H, Dh).
    for index, dense in enumerate((att.query_dense, att.key_dense, att.value_dense)):
        columns = slice(index * hidden, (index + 1) * hidden)
        pairs.append((
            ours.attn.qkv.kernel, dense.kernel,
            lambda w, c=columns: w[:, c].reshape(hidden, num_heads, head_dim),
            ("kernel", index),
        ))
        pairs.append((
            ours.attn.qkv.bias, dense.bias,
            lambda b, c=columns: b[c].reshape(num_heads, head_dim),
            ("bias", index),
        ))
    return pairs


def _variable_pairs(model, backbone):
    vision, text = backbone.vision_encoder, backbone.text_encoder
    ours_v, ours_t = model.visual, model.text
    pairs = [
        (ours_v.conv1.kernel, vision.embedding.patch_embedding.kernel, _identity, _identity),
        (ours_v.class_embedding, vision.embedding.class_embedding, _identity, _identity),
        (ours_v.positional_embedding, vision.embedding.position_embedding.embeddings,
         _identity, _identity),
        (ours_v.ln_pre.gamma, vision.pre_layer_norm.gamma, _identity, _identity),
        (ours_v.ln_pre.beta, vision.pre_layer_norm.beta, _identity, _identity),
        (ours_v.ln_post.gamma, vision.layer_norm.gamma, _identity, _identity),
        (ours_v.ln_post.beta, vision.layer_norm.beta, _identity, _identity),
        (ours_v.proj, backbone.vision_projection.kernel, _identity, _identity),
        (ours_t.token_embedding.embeddings, text.embedding.token_embedding.embeddings,
         _identity, _identity),
        (ours_t.positional_embedding, text.embedding.position_embedding.position_embeddings,
         _identity, _identity),
        (ours_t.ln_final.gamma, text.layer_norm.gamma, _identity, _identity),
        (ours_t.ln_final.beta, text.layer_norm.beta, _identity, _identity),
        (ours_t.text_projection, backbone.text_projection.kernel, _identity, _identity),
        (model.logit_scale.log_scale, backbone.clip_head.logit_scale, _identity, _identity),
    ]
    for ours, theirs in zip(ours_v.resblocks, vision.encoder_layers):
        pairs += _block_pairs(ours, theirs, model.vision_num_heads)
    for ours, theirs in zip(ours_t.resblocks, text.encoder_layers):
        pairs += _block_pairs(ours, theirs, model.text_num_heads)
    return pairs


def _assign(variable, value):
    value = np.asarray(value, dtype=np.float32)
    if tuple(variable.shape) != value.shape:
        raise ValueError(
            f"Shape mismatch converting {variable.path}: expected {tuple(variable.shape)}, "
            f"got {value.shape}"
        )
    variable.assign(value)


def to_keras_hub(model):
    """A keras-hub `CLIPBackbone` holding this keras_clip ViT `CLIP`'s weights.

    Raises:
        ValueError: a ResNet image tower, or a setting keras-hub cannot represent.
        ImportError: keras-hub is not installed.
    """
    keras_hub = import_keras_hub()
    _check_convertible(model)
    kwargs = backbone_kwargs(model)
    backbone = keras_hub.models.CLIPBackbone(
        vision_encoder=keras_hub.models.CLIPVisionEncoder(**kwargs["vision"], name="vision_encoder"),
        text_encoder=keras_hub.models.CLIPTextEncoder(**kwargs["text"], name="text_encoder"),
        projection_dim=kwargs["projection_dim"],
    )
    embedding = backbone.vision_encoder.embedding
    embedding.position_ids.assign(np.arange(embedding.num_positions)[None])
    for ours, theirs, to_hub, _ in _variable_pairs(model, backbone):
        _assign(theirs, to_hub(np.asarray(ours.numpy())))
    return backbone


def from_keras_hub(backbone, cls=None, **kwargs):
    """A keras_clip `CLIP` holding a keras-hub `CLIPBackbone`'s weights.

    Args:
        backbone: a `keras_hub.models.CLIPBackbone`.
        cls: the class to build (default `keras_clip.CLIP`).
        **kwargs: overrides of `CLIP` constructor arguments (e.g. `dtype`).
    """
    if cls is None:
        from keras_clip.models.clip import CLIP as cls  # noqa: N813
    model = cls(**{**clip_kwargs(backbone), **kwargs})
    qkv = {}
    for ours, theirs, _, from_hub in _variable_pairs(model, backbone):
        value = np.asarray(theirs.numpy())
        if isinstance(from_hub, tuple):  # one third of a packed q/k/v projection
            kind, index = from_hub
            flat = value.reshape(value.shape[0], -1) if kind == "kernel" else value.reshape(-1)
            qkv.setdefault(id(ours), (ours, kind, {}))[2][index] = flat
            continue
        _assign(ours, from_hub(value))
    for ours, kind, parts in qkv.values():
        _assign(ours, np.concatenate([parts[i] for i in range(3)], axis=-1))
    return model


def preprocessor(model):
    """A keras-hub `CLIPPreprocessor` as close to OpenAI's pipeline as keras-hub allows.

    Tokenizer: keras_clip's BPE vocabulary and merges, `sequence_length` =
    `context_length`, padded with 0 like OpenAI. Images: `image_size`, OpenAI's mean and
    std as `scale`/`offset`, bicubic with antialiasing. See the module docstring for
    what still differs.
    """
    keras_hub = import_keras_hub()
    from keras_clip.convert import writers

    vocab, merges_text = writers.hf_vocabulary()
    merges = [line for line in merges_text.split("\n")[1:] if line]
    tokenizer = keras_hub.models.CLIPTokenizer(vocabulary=vocab, merges=merges)
    pre = writers.preprocessing_config(model)
    converter = keras_hub.layers.CLIPImageConverter(
        image_size=(model.image_size, model.image_size),
        scale=[1.0 / (255.0 * s) for s in pre["std"]],
        offset=[-m / s for m, s in zip(pre["mean"], pre["std"])],
        interpolation="bicubic",
        antialias=True,
        crop_to_aspect_ratio=True,
    )
    return keras_hub.models.CLIPPreprocessor(
        tokenizer=tokenizer, image_converter=converter, sequence_length=model.context_length,
    )


def save_keras_hub_preset(model, folder):
    """Writes a keras-hub preset folder (backbone + preprocessor) for `model`.

    Load it with `keras_hub.models.CLIPBackbone.from_preset(folder)` and
    `keras_hub.models.CLIPPreprocessor.from_preset(folder)`; `CLIP.from_preset(folder)`
    reads it back into keras_clip.
    """
    backbone = to_keras_hub(model)
    backbone.save_to_preset(folder)
    preprocessor(model).save_to_preset(folder)
    return sorted(os.path.join(folder, name) for name in os.listdir(folder))


def load_keras_hub_preset(cls, folder, load_weights=True, **kwargs):
    """Builds a keras_clip `CLIP` from a keras-hub `CLIPBackbone` preset folder."""
    keras_hub = import_keras_hub()
    backbone = keras_hub.models.CLIPBackbone.from_preset(folder, load_weights=load_weights)
    if not load_weights:
        return cls(**{**clip_kwargs(backbone), **kwargs})
    return from_keras_hub(backbone, cls, **kwargs)


def is_keras_hub_preset(config):
    """Whether a parsed `config.json` is a keras-hub CLIPBackbone preset's."""
    return config.get("class_name") == "CLIPBackbone" and "keras_hub" in str(config.get("module", ""))
