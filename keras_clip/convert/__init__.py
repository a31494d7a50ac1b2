"""Resolving `CLIP.from_preset` arguments: names, folders, hub repos and checkpoint files."""
import json
import os

from absl import logging

from keras_clip import presets
from keras_clip.convert import huggingface, keras_hub_converter, openai
from keras_clip.convert.checkpoint import TORCH_SUFFIXES, CheckpointError, read_state_dict
from keras_clip.preprocessing.config import PreprocessingConfig

__all__ = ["CheckpointError", "load_preset", "read_state_dict"]

_OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
)


def _download(repo, filename):
    """Fetches `filename` from the Hugging Face Hub, with a clear offline message."""
    import huggingface_hub

    try:
        return huggingface_hub.hf_hub_download(repo, filename)
    except Exception as e:  # noqa: BLE001 - offline, not found, auth: all need the same advice
        raise FileNotFoundError(
            f"Could not download `{filename}` from the Hugging Face repo `{repo}` "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline? "
            f"Download it on a machine with internet access (https://huggingface.co/{repo}) "
            f"and pass the local file to `CLIP.from_preset('/path/to/{filename}')`, or "
            "place it in the Hugging Face cache (HF_HOME) so that hf_hub_download finds it."
        ) from e


def _build(cls, config, kwargs):
    config = {**config, **kwargs}
    model = cls(**config)
    counts = model.count_params_by_tower()
    logging.info(
        "Built CLIP (%s vision): %s parameters (visual %s, text %s)",
        model.vision_architecture, f"{counts['total']:,}", f"{counts['visual']:,}", f"{counts['text']:,}",
    )
    return model


def _from_openai_state_dict(cls, sd, load_weights, defaults, kwargs):
    config = {**defaults, **openai.config_from_state_dict(sd)}
    model = _build(cls, config, kwargs)
    if load_weights:
        openai.load_state_dict(model, sd)
    return model


def _from_file(cls, path, load_weights, kwargs):
    if not (path.endswith(".safetensors") or path.endswith(TORCH_SUFFIXES)):
        raise ValueError(
            f"Unrecognised checkpoint file {path!r}: expected .pt/.pth/.bin/.ckpt "
            "(PyTorch) or .safetensors"
        )
    sd = read_state_dict(path)
    if "text_model.embeddings.token_embedding.weight" in sd:
        folder_config = os.path.join(os.path.dirname(path), "config.json")
        if not os.path.isfile(folder_config):
            raise CheckpointError(
                f"{path} is a Hugging Face CLIPModel checkpoint; load its folder "
                "(with config.json) instead of the weights file"
            )
        return _from_folder(cls, os.path.dirname(path), load_weights, kwargs)
    # OpenAI weights use QuickGELU; files do not record it, so LAION users pass
    # activation="gelu" (or use the named preset / hub folder, which know).
    # safetensors written by `CLIP.save_checkpoint` record it in their metadata.
    activation = _safetensors_activation(path) or "quick_gelu"
    return _from_openai_state_dict(cls, sd, load_weights, {"activation": activation}, kwargs)


def _safetensors_activation(path):
    """The activation recorded by `save_checkpoint(format="openai")`, else None."""
    if not path.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        activation = (f.metadata() or {}).get("keras_clip_activation")
    return activation if activation in ("quick_gelu", "gelu") else None


def _read_preprocessing(model, block):
    """Sets `model.preprocessor_config` from a preset's `preprocessing` block (missing
    keys: today's defaults); the model's own sizes and pixel limit win, so kwargs
    overriding them at load time apply to the preprocessing too."""
    model.preprocessor_config = PreprocessingConfig.from_dict(
        block, image_size=model.image_size, context_length=model.context_length,
        max_image_pixels=model.max_image_pixels)
    return model


def _json(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _from_folder(cls, path, load_weights, kwargs):
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            meta = json.load(f)
        if meta.get("module") == "keras_clip":
            model = _build(cls, meta["config"], kwargs)
            _read_preprocessing(model, meta.get("preprocessing"))
            if load_weights:
                model.load_weights(os.path.join(path, "model.weights.h5"))
            return model
        if keras_hub_converter.is_keras_hub_preset(meta):
            return keras_hub_converter.load_keras_hub_preset(cls, path, load_weights, **kwargs)
    if huggingface.is_hf_folder(path):
        with open(config_path) as f:
            config = huggingface.config_from_hf(json.load(f))
        huggingface.check_config(config)
        sd = None
        if load_weights:
            weights = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin")]
            weights = [w for w in weights if os.path.isfile(w)]
            if not weights:
                raise CheckpointError(f"No model.safetensors or pytorch_model.bin in {path}")
            sd = huggingface.state_dict_from_hf(read_state_dict(weights[0]))
            # Before building: config.json must describe the model the weights fill.
            huggingface.check_config_matches_weights(config, sd)
        model = _build(cls, config, kwargs)
        processor = _json(os.path.join(path, "preprocessor_config.json"))
        _read_preprocessing(model, {key: processor[hf_key] for key, hf_key in
                                    (("mean", "image_mean"), ("std", "image_std")) if hf_key in processor})
        if sd is not None:
            openai.load_state_dict(model, sd)
        return model
    open_clip_config = os.path.join(path, "open_clip_config.json")
    weights = [os.path.join(path, n) for n in _OPEN_CLIP_WEIGHTS if os.path.isfile(os.path.join(path, n))]
    if weights:
        activation, preprocess_cfg = "quick_gelu", {}
        if os.path.isfile(open_clip_config):
            with open(open_clip_config) as f:
                meta = json.load(f)
            activation = "quick_gelu" if meta.get("model_cfg", {}).get("quick_gelu") else "gelu"
            preprocess_cfg = meta.get("preprocess_cfg", {})
        sd = read_state_dict(weights[0])
        model = _from_openai_state_dict(cls, sd, load_weights, {"activation": activation}, kwargs)
        return _read_preprocessing(model, {key: preprocess_cfg[key] for key in
                                           ("mean", "std", "interpolation", "resize_mode")
                                           if key in preprocess_cfg})
    raise ValueError(
        f"{path!r} is not a keras_clip preset folder (config.json + model.weights.h5), a "
        "Hugging Face CLIP folder (config.json + model.safetensors) or an open_clip folder "
        f"({' / '.join(_OPEN_CLIP_WEIGHTS)})"
    )


def _from_hf_repo(cls, repo, load_weights, kwargs):
    import huggingface_hub

    try:
        files = set(huggingface_hub.list_repo_files(repo))
    except Exception as e:  # noqa: BLE001
        raise FileNotFoundError(
            f"Could not list the Hugging Face repo `{repo}` ({type(e).__name__}). Offline? "
            f"Download the repo on a machine with internet access and pass its local folder "
            "to CLIP.from_preset."
        ) from e
    wanted = ["config.json", "model.safetensors"] if "model.safetensors" in files else []
    if not wanted:
        found = [n for n in _OPEN_CLIP_WEIGHTS if n in files]
        if not found:
            raise CheckpointError(f"hf://{repo} has neither model.safetensors nor open_clip weights")
        wanted = [found[0]] + (["open_clip_config.json"] if "open_clip_config.json" in files else [])
    local = [_download(repo, name) for name in (wanted if load_weights else wanted[-1:])]
    return _from_folder(cls, os.path.dirname(local[0]), load_weights, kwargs)


def load_preset(cls, preset, load_weights=True, **kwargs):
    """See `CLIP.from_preset`."""
    preset = os.fspath(preset)
    name = presets.resolve_name(preset)
    if name in presets.ARCHITECTURES:
        return _build(cls, presets.ARCHITECTURES[name][2], kwargs)
    if name in presets.WEIGHTS:
        arch, overrides, repo, filename = presets.WEIGHTS[name]
        if not load_weights:
            return _build(cls, {**presets.ARCHITECTURES[arch][2], **overrides}, kwargs)
        path = _download(repo, filename)
        sd = read_state_dict(path)
        return _from_openai_state_dict(cls, sd, True, overrides, kwargs)
    if preset.startswith("hf://"):
        return _from_hf_repo(cls, preset[len("hf://"):].strip("/"), load_weights, kwargs)
    if os.path.isdir(preset):
        return _from_folder(cls, preset, load_weights, kwargs)
    if os.path.isfile(preset):
        return _from_file(cls, preset, load_weights, kwargs)
    raise ValueError(
        f"Unknown preset {preset!r}: not a built-in preset name, an hf:// repo, or an "
        f"existing file or folder. Built-in presets: {sorted(presets.list_presets())}"
    )
