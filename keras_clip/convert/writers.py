"""Writing a keras_clip `CLIP` as an open_clip, OpenAI or Hugging Face checkpoint.

The inverse of the readers in `keras_clip.convert`: `state_dict_from_model` walks the
model exactly as `openai.load_state_dict` does and applies the inverse transform of
each tensor (transposes only), so writing then reading gives bit-identical variables.

Formats (`save_checkpoint`):

* `"open_clip"`: a folder in the layout open_clip publishes on the Hugging Face Hub:
  `open_clip_model.safetensors` (open_clip's `CLIP` state dict, which keeps OpenAI's
  parameter names), `open_clip_config.json` (`model_cfg` with the architecture and
  `quick_gelu`, `preprocess_cfg` with image size, mean, std, interpolation), and the
  bare model config as `<open_clip_name>.json` for `open_clip.add_model_config`.
  open_clip loads the folder with `create_model_and_transforms("local-dir:<folder>")`.
* `"openai"`: one file, OpenAI's state-dict layout; `.safetensors` or `.pt`
  (`torch.save` of a dict of tensors only, loadable with `weights_only=True`). A bare
  state dict cannot record the activation: OpenAI's readers assume QuickGELU (the
  safetensors metadata records it for keras_clip's reader).
* `"hf"`: a transformers `CLIPModel` folder: `config.json`, `model.safetensors`,
  tokenizer files made from keras_clip's BPE vocabulary and `preprocessor_config.json`.
  transformers has no class for the modified-ResNet image tower.
* `"keras_hub"`: a keras-hub preset folder (`keras_hub_converter`, ViT only).

See docs/moving_models.md for how each library loads these and where it differs.
"""
import json
import math
import os

import numpy as np
from absl import logging

from keras_clip.convert import openai

FORMATS = ("open_clip", "openai", "hf", "keras_hub")

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
HF_WEIGHTS = "model.safetensors"

# transformers' and OpenAI's spelling of the special tokens (keras_clip's in-graph
# tokenizer uses its own names internally; the ids are the same: 49406, 49407).
HF_START_TOKEN = "<|startoftext|>"
HF_END_TOKEN = "<|endoftext|>"

# open_clip's built-in names for the paper's architectures (keras_clip preset ->
# open_clip config file stem). "-quickgelu" variants exist for every one of them.
_OPEN_CLIP_NAMES = {
    "clip_rn50": "RN50", "clip_rn101": "RN101", "clip_rn50x4": "RN50x4",
    "clip_rn50x16": "RN50x16", "clip_rn50x64": "RN50x64", "clip_vit_b32": "ViT-B-32",
    "clip_vit_b16": "ViT-B-16", "clip_vit_l14": "ViT-L-14", "clip_vit_l14_336": "ViT-L-14-336",
}


# -- OpenAI / open_clip state dict --------------------------------------------------


class _Collector(openai.LayoutVisitor):
    """Reads variables into OpenAI-layout tensors: the inverse of `openai._Assigner`."""

    def __init__(self):
        self.sd = {}

    def __call__(self, variable, key, to_torch=None, to_keras=None):
        value = np.asarray(variable.numpy(), dtype=np.float32)
        value = to_torch(value) if to_torch is not None else value
        self.sd[key] = np.array(value, dtype=np.float32, order="C")  # keeps 0-d shapes

    def batch_norm(self, layer, prefix):
        super().batch_norm(layer, prefix)
        # PyTorch's BatchNorm2d keeps a step counter that strict loading expects. It
        # only matters when momentum=None (cumulative averages); CLIP uses 0.1.
        self.sd[prefix + ".num_batches_tracked"] = np.zeros((), np.int64)


def state_dict_from_model(model):
    """The model's weights as `{name: float32 array}` in OpenAI's state-dict layout.

    The same names and shapes as OpenAI's released checkpoints and open_clip's `CLIP`
    (`logit_scale` is a 0-d tensor; BatchNorm layers get `num_batches_tracked = 0`).
    """
    collector = _Collector()
    openai.visit_layout(model, collector)
    return collector.sd


def _check_representable(model, target, hf=False, bias=True):
    """Raises for settings the target format cannot record (outputs would differ)."""
    if not bias and model.contrastive_loss == "sigmoid":
        raise ValueError(
            f"{target} CLIP models have no `logit_bias`, so a model trained with the sigmoid "
            "loss cannot be written as one; write format='open_clip' or 'openai'. "
            f"Received: loss={model.contrastive_loss!r}")
    if not hf and model.layer_norm_epsilon != 1e-5:
        raise ValueError(
            f"{target} models use LayerNorm epsilon 1e-5 and cannot record another value. "
            f"Received: layer_norm_epsilon={model.layer_norm_epsilon}"
        )
    if model.vision_architecture == "resnet" and model.batch_norm_epsilon != 1e-5:
        raise ValueError(
            f"{target} models use BatchNorm epsilon 1e-5 and cannot record another value. "
            f"Received: batch_norm_epsilon={model.batch_norm_epsilon}"
        )
    if not hf and model.end_token_id != model.vocabulary_size - 1:
        raise ValueError(
            f"{target} text towers pool at the highest token id (argmax), so the end token "
            "must be the last vocabulary entry. Received: "
            f"end_token_id={model.end_token_id}, vocabulary_size={model.vocabulary_size}"
        )


# -- preprocessing --------------------------------------------------------------


def preprocessing_config(model):
    """Image size, mean, std, interpolation and resize mode of `model.preprocessor_config`."""
    config = model.preprocessor_config
    return {
        "image_size": int(config.image_size),
        "mean": [float(m) for m in config.mean],
        "std": [float(s) for s in config.std],
        "interpolation": config.interpolation,
        "resize_mode": config.resize_mode,
    }


# -- open_clip ----------------------------------------------------------------------


def open_clip_model_config(model):
    """open_clip's model config (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`).

    The same keys as open_clip's `model_configs/*.json`; `head_width` and `mlp_ratio`
    are written whenever the model departs from open_clip's defaults (64, 4.0).
    """
    if model.vision_architecture == "vit":
        width = model.vision_hidden_dim
        vision = {
            "image_size": model.image_size,
            "layers": model.vision_num_layers,
            "width": width,
            "patch_size": model.vision_patch_size,
        }
        head_width = width // model.vision_num_heads
        mlp_ratio = (model.vision_intermediate_dim or 4 * width) / width
    else:
        width = model.vision_hidden_dim
        vision = {
            "image_size": model.image_size,
            "layers": list(model.vision_num_layers),
            "width": width,
            "patch_size": None,
        }
        # open_clip: attention-pool heads = width * 32 // head_width.
        head_width = width * 32 // model.vision_num_heads
        mlp_ratio = 4.0
    if head_width != 64:
        vision["head_width"] = head_width
    if mlp_ratio != 4.0:
        vision["mlp_ratio"] = mlp_ratio
    text_width = model.text_hidden_dim
    text = {
        "context_length": model.context_length,
        "vocab_size": model.vocabulary_size,
        "width": text_width,
        "heads": model.text_num_heads,
        "layers": model.text_num_layers,
    }
    text_mlp_ratio = (model.text_intermediate_dim or 4 * text_width) / text_width
    if text_mlp_ratio != 4.0:
        text["mlp_ratio"] = text_mlp_ratio
    config = {"embed_dim": model.embed_dim}
    if model.activation == "quick_gelu":
        config["quick_gelu"] = True
    if model.contrastive_loss == "sigmoid":  # open_clip's CLIP then has a `logit_bias`
        config["init_logit_bias"] = float(model.logit_bias.bias.numpy())
    config.update(vision_cfg=vision, text_cfg=text)
    return config


def open_clip_name(model):
    """open_clip's built-in name for this architecture, or a descriptive new name.

    Built-in names (`"ViT-B-32-quickgelu"`, `"RN50"`, ...) load with
    `open_clip.create_model(name, pretrained=file)` with no extra config.
    """
    from keras_clip import presets

    config = model.get_config()
    for preset, name in (_OPEN_CLIP_NAMES.items() if model.contrastive_loss == "softmax" else ()):
        kwargs = presets.ARCHITECTURES[preset][2]
        if all(config.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()) and (
            config["vision_intermediate_dim"] in (None, 4 * config["vision_hidden_dim"])
            and config["text_intermediate_dim"] in (None, 4 * config["text_hidden_dim"])
            and config["context_length"] == 77 and config["vocabulary_size"] == 49408
        ):
            return name + ("-quickgelu" if model.activation == "quick_gelu" else "")
    if model.vision_architecture == "vit":
        vision = f"ViT-p{model.vision_patch_size}-w{model.vision_hidden_dim}-l{model.vision_num_layers}"
    else:
        vision = f"RN{'-'.join(map(str, model.vision_num_layers))}-w{model.vision_hidden_dim}"
    return (
        f"keras_clip-{vision}-{model.image_size}px-e{model.embed_dim}"
        f"{'-quickgelu' if model.activation == 'quick_gelu' else ''}"
        f"{'-sigmoid' if model.contrastive_loss == 'sigmoid' else ''}"
    )


def write_open_clip(model, folder):
    """Writes the open_clip folder (see the module docstring). Returns its file paths."""
    from safetensors.numpy import save_file

    _check_representable(model, "open_clip")
    os.makedirs(folder, exist_ok=True)
    model_cfg = open_clip_model_config(model)
    pre = preprocessing_config(model)
    name = open_clip_name(model)
    weights = os.path.join(folder, OPEN_CLIP_WEIGHTS)
    save_file(state_dict_from_model(model), weights, metadata={"format": "pt"})
    config_path = os.path.join(folder, OPEN_CLIP_CONFIG)
    _write_json(config_path, {
        "model_cfg": model_cfg,
        "preprocess_cfg": {k: pre[k] for k in ("mean", "std", "interpolation", "resize_mode")},
        "model_name": name,
        "written_by": "keras_clip",
    })
    model_config_path = os.path.join(folder, f"{name}.json")
    _write_json(model_config_path, model_cfg)
    logging.info("Wrote open_clip checkpoint %s (open_clip architecture %r)", folder, name)
    return [weights, config_path, model_config_path]


# -- OpenAI -------------------------------------------------------------------------


def write_openai(model, path):
    """Writes an OpenAI-layout state dict to `.safetensors` or `.pt`."""
    _check_representable(model, "OpenAI")
    if model.activation != "quick_gelu":
        logging.warning(
            "An OpenAI-layout state dict cannot record activation=%r for other readers, "
            "which assume QuickGELU (keras_clip reads it from .safetensors metadata). "
            "Load it with quick_gelu=False (open_clip) or activation='gelu' (keras_clip, "
            ".pt), or use format='open_clip' / 'hf', which record it.",
            model.activation,
        )
    sd = state_dict_from_model(model)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(sd, path, metadata={"format": "pt", "keras_clip_activation": model.activation})
    elif path.endswith((".pt", ".pth", ".bin")):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                "Writing a PyTorch `.pt` file needs torch: pip install 'keras_clip[torch]' "
                "(or write `.safetensors`, which does not)"
            ) from e
        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    else:
        raise ValueError(
            "`path` for format='openai' must end with .safetensors, .pt, .pth or .bin. "
            f"Received: path={path!r}"
        )
    logging.info("Wrote OpenAI-layout state dict %s (%d tensors)", path, len(sd))
    return [path]


# -- Hugging Face transformers ------------------------------------------------------

_HF_BLOCK_RENAMES = [
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
]
_HF_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic, transformers' name
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}


def hf_state_dict(sd):
    """OpenAI-layout tensors -> transformers `CLIPModel` names (the inverse of
    `huggingface.state_dict_from_hf`)."""
    hf = {}
    for key, value in sd.items():
        if key in _HF_RENAMES:
            hf[_HF_RENAMES[key]] = value
        elif key == "text_projection":
            hf["text_projection.weight"] = np.ascontiguousarray(value.T)
        elif key == "visual.proj":
            hf["visual_projection.weight"] = np.ascontiguousarray(value.T)
        else:
            visual = key.startswith("visual.transformer.resblocks.")
            if not (visual or key.startswith("transformer.resblocks.")):
                raise ValueError(f"No Hugging Face CLIPModel name for tensor `{key}`")
            rest = key.split(".", 4 if visual else 3)[-1]
            index = key.split(".")[3 if visual else 2]
            prefix = f"{'vision' if visual else 'text'}_model.encoder.layers.{index}"
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]  # weight / bias
                for name, part in zip("qkv", np.split(value, 3, axis=0)):
                    hf[f"{prefix}.self_attn.{name}_proj.{kind}"] = np.ascontiguousarray(part)
                continue
            for old, new in _HF_BLOCK_RENAMES:
                rest = rest.replace(old, new)
            hf[f"{prefix}.{rest}"] = value
    return hf


def hf_config(model):
    """A transformers `CLIPConfig` dict recording architecture and activation."""
    common = dict(hidden_act=model.activation, layer_norm_eps=model.layer_norm_epsilon)
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": model.embed_dim,
        "logit_scale_init_value": math.log(model.initial_logit_scale),
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": model.vocabulary_size,
            "hidden_size": model.text_hidden_dim,
            "intermediate_size": model.text_intermediate_dim or 4 * model.text_hidden_dim,
            "num_hidden_layers": model.text_num_layers,
            "num_attention_heads": model.text_num_heads,
            "max_position_embeddings": model.context_length,
            "projection_dim": model.embed_dim,
            # eos_token_id != 2 makes transformers pool at the first end token, as
            # keras_clip does (2 selects its legacy argmax pooling).
            "bos_token_id": model.end_token_id - 1,  # OpenAI's vocabulary: start, end last
            "eos_token_id": model.end_token_id,
            "pad_token_id": 1,
            **common,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": model.vision_hidden_dim,
            "intermediate_size": model.vision_intermediate_dim or 4 * model.vision_hidden_dim,
            "num_hidden_layers": model.vision_num_layers,
            "num_attention_heads": model.vision_num_heads,
            "image_size": model.image_size,
            "patch_size": model.vision_patch_size,
            "num_channels": 3,
            "projection_dim": model.embed_dim,
            **common,
        },
    }


def hf_vocabulary():
    """(`vocab.json` dict, `merges.txt` text) from keras_clip's BPE asset."""
    from keras_clip.preprocessing import tokenizer

    merges = tokenizer.load_merges()
    tokens = tokenizer.build_vocabulary(merges)
    tokens[-2:] = [HF_START_TOKEN, HF_END_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return vocab, merges_text


def write_hf(model, folder):
    """Writes a transformers CLIP folder (see the module docstring)."""
    from safetensors.numpy import save_file

    if model.vision_architecture != "vit":
        raise ValueError(
            "Hugging Face transformers has no CLIP class for the modified-ResNet image "
            "tower (its CLIPModel is ViT-only); write format='open_clip' or 'openai' "
            f"instead. Received: vision_architecture={model.vision_architecture!r}"
        )
    _check_representable(model, "Hugging Face", hf=True, bias=False)
    os.makedirs(folder, exist_ok=True)
    files = {}
    files["weights"] = os.path.join(folder, HF_WEIGHTS)
    save_file(hf_state_dict(state_dict_from_model(model)), files["weights"], metadata={"format": "pt"})
    files["config"] = os.path.join(folder, "config.json")
    _write_json(files["config"], hf_config(model))

    vocab, merges_text = hf_vocabulary()
    files["vocab"] = os.path.join(folder, "vocab.json")
    _write_json(files["vocab"], vocab, indent=None)
    files["merges"] = os.path.join(folder, "merges.txt")
    with open(files["merges"], "w", encoding="utf-8") as f:
        f.write(merges_text)
    special = {
        "bos_token": HF_START_TOKEN, "eos_token": HF_END_TOKEN,
        "unk_token": HF_END_TOKEN, "pad_token": HF_END_TOKEN,
    }
    files["special_tokens_map"] = os.path.join(folder, "special_tokens_map.json")
    _write_json(files["special_tokens_map"], special)
    files["tokenizer_config"] = os.path.join(folder, "tokenizer_config.json")
    _write_json(files["tokenizer_config"], {
        "tokenizer_class": "CLIPTokenizer",
        "processor_class": "CLIPProcessor",
        "model_max_length": model.context_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    })
    pre = preprocessing_config(model)
    size = pre["image_size"]
    files["preprocessor_config"] = os.path.join(folder, "preprocessor_config.json")
    _write_json(files["preprocessor_config"], {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # PIL.Image.BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": pre["mean"],
        "image_std": pre["std"],
        "do_convert_rgb": True,
    })
    logging.info("Wrote Hugging Face CLIP folder %s", folder)
    return list(files.values())


def _write_json(path, data, indent=2):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, ensure_ascii=False)
        f.write("\n")


# -- entry point ----------------------------------------------------------------------


def save_checkpoint(model, path, format):  # noqa: A002 - the public argument name
    """See `CLIP.save_checkpoint`."""
    path = os.fspath(path)
    text_architecture = getattr(model, "text_architecture", "transformer")
    if format in FORMATS and text_architecture != "transformer":
        raise ValueError(
            f"The {format} format holds a transformer text tower only; save a "
            f"{text_architecture} model with `save_to_preset`. "
            f"Received: text_architecture={text_architecture!r}")
    if format == "open_clip":
        return write_open_clip(model, path)
    if format == "openai":
        return write_openai(model, path)
    if format == "hf":
        return write_hf(model, path)
    if format == "keras_hub":
        from keras_clip.convert import keras_hub_converter

        return keras_hub_converter.save_keras_hub_preset(model, path)
    raise ValueError(f"`format` must be one of {FORMATS}. Received: format={format!r}")


def convert(preset, format, output, **kwargs):  # noqa: A002
    """Loads `preset` (`CLIP.from_preset`) and writes it with `save_checkpoint`.

    Args:
        preset: anything `CLIP.from_preset` accepts (name, folder, file, `hf://`).
        format: one of `FORMATS`.
        output: file or folder to write.
        **kwargs: `CLIP.from_preset` overrides (e.g. `activation="gelu"`).

    Returns:
        List of the paths written.
    """
    from keras_clip.models.clip import CLIP

    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}. Received: format={format!r}")
    model = CLIP.from_preset(preset, **kwargs)
    return save_checkpoint(model, output, format)
