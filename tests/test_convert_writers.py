"""Writing models for open_clip, OpenAI, Hugging Face and keras-hub, and reading them back.

Each written file is loaded with the target library's own code (its loader, tokenizer
and image preprocessing) and must give keras_clip's embeddings within 1e-5; reading the
file back into keras_clip must give bit-identical variables.
"""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image, ImageDraw

import keras_clip
from keras_clip import CLIP
from tests import harness

TOLERANCE = 1e-5
CAPTIONS = ["a photo of a cat", "Two dogs playing in the snow.", "a red car parked by a tree"]

VIT = harness.SMALL_VIT
RESNET = harness.SMALL_RESNET
CASES = {
    "vit_quick_gelu": dict(VIT, activation="quick_gelu"),
    "vit_gelu": dict(VIT, activation="gelu"),
    "resnet_quick_gelu": dict(RESNET, activation="quick_gelu"),
}


def _perturbed_clip(config, seed=0):
    """A CLIP whose every variable is moved off its initial value (LayerNorm gains,
    biases, BatchNorm statistics...), so a misplaced or transposed tensor shows."""
    keras.utils.set_random_seed(seed)
    return harness.perturb_weights(CLIP(**config), seed)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return request.param, _perturbed_clip(CASES[request.param], seed=len(request.param))


@pytest.fixture(scope="module")
def vit_model():
    return _perturbed_clip(CASES["vit_quick_gelu"], seed=11)


@pytest.fixture(scope="module")
def photos():
    """Three RGB images of different sizes and aspect ratios (so resize and crop run).

    The crop margins after resizing are even: for an odd margin transformers'
    center crop rounds the offset down where OpenAI's rounds half to even, a shift of
    one row (see docs/moving_models.md).
    """
    rng = np.random.default_rng(0)
    images = []
    for height, width in [(80, 96), (100, 72), (64, 64)]:
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([255 * x / width, 255 * y / height, 128 + 60 * np.sin(x / 5.0)], -1)
        noise = rng.normal(0, 20, (height, width, 3))
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        ImageDraw.Draw(image).ellipse([width // 4, height // 4, width // 2, height // 2],
                                      fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        images.append(image)
    return images


def _keras_clip_embeddings(model, photos, captions=CAPTIONS):
    pixels = np.stack([
        np.asarray(model.image_preprocessor()(np.asarray(p)[None]))[0] for p in photos
    ])  # (B, S, S, 3)
    tokens = np.asarray(keras_clip.tokenize(captions, model.context_length))
    return pixels, tokens, np.asarray(model.encode_image(pixels)), np.asarray(model.encode_text(tokens))


def _assert_identical_weights(expected, actual):
    assert len(expected.weights) == len(actual.weights)
    for a, b in zip(expected.weights, actual.weights):
        assert a.path.split("/", 1)[1] == b.path.split("/", 1)[1]
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def _torch_embeddings(model, pixels_nchw, tokens):
    import torch

    with torch.no_grad():
        image = model.encode_image(pixels_nchw, normalize=True)
        text = model.encode_text(tokens, normalize=True)
    return image.numpy(), text.numpy()


# -- open_clip ----------------------------------------------------------------------


def test_open_clip_folder_matches_open_clip(case, photos, open_clip_module, tmp_path):
    import torch

    open_clip = open_clip_module
    name, model = case
    folder = tmp_path / "open_clip"
    model.save_checkpoint(folder, format="open_clip")
    pixels, tokens, image, text = _keras_clip_embeddings(model, photos)

    # The folder alone: open_clip's local-dir loader, tokenizer and image transform.
    reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    reference.eval()
    reference_tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(CAPTIONS)
    reference_pixels = torch.stack([preprocess(p) for p in photos])
    np.testing.assert_array_equal(reference_tokens.numpy(), tokens)
    np.testing.assert_array_equal(reference_pixels.permute(0, 2, 3, 1).numpy(), pixels)
    ref_image, ref_text = _torch_embeddings(reference, reference_pixels, reference_tokens)
    assert np.max(np.abs(ref_image - image)) <= TOLERANCE
    assert np.max(np.abs(ref_text - text)) <= TOLERANCE

    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"].get("quick_gelu", False) == (model.activation == "quick_gelu")
    assert config["preprocess_cfg"]["mean"] == [0.48145466, 0.4578275, 0.40821073]

    # The model config JSON registered by name + pretrained=<weights file>, strict load.
    model_name = config["model_name"]
    open_clip.add_model_config(folder / f"{model_name}.json")
    by_name = open_clip.create_model(
        model_name, pretrained=str(folder / "open_clip_model.safetensors")).eval()
    named_image, named_text = _torch_embeddings(by_name, reference_pixels, reference_tokens)
    np.testing.assert_array_equal(named_image, ref_image)
    np.testing.assert_array_equal(named_text, ref_text)

    reread = CLIP.from_preset(str(folder))
    assert reread.activation == model.activation
    _assert_identical_weights(model, reread)


def test_open_clip_name_is_the_built_in_one_for_paper_architectures():
    from keras_clip.convert import writers

    rn50 = CLIP.from_preset("clip_rn50", load_weights=False)
    vit = CLIP.from_preset("clip_vit_b32", load_weights=False, activation="gelu")
    assert writers.open_clip_name(rn50) == "RN50-quickgelu"
    assert writers.open_clip_name(vit) == "ViT-B-32"
    assert writers.open_clip_model_config(vit) == {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    }


# -- OpenAI -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_openai_state_dict_matches_openai_build_model(case, suffix, photos, open_clip_module, tmp_path):
    import torch
    from safetensors.torch import load_file

    name, model = case
    path = tmp_path / f"model{suffix}"
    model.save_checkpoint(path, format="openai")
    pixels, tokens, image, text = _keras_clip_embeddings(model, photos)

    if suffix == ".pt":
        state = torch.load(path, weights_only=True)  # a dict of tensors, nothing else
    else:
        state = load_file(str(path))
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    # OpenAI's `build_model` (open_clip's copy) infers the architecture from the
    # tensors. It rounds weights to float16, so the fp32 tensors are loaded again
    # (strict: every key must match OpenAI's layout) after casting back to float32.
    reference = open_clip_module.model.build_model_from_openai_state_dict(
        dict(state), quick_gelu=model.activation == "quick_gelu").float()
    reference.load_state_dict(state, strict=True)
    reference.eval()
    ref_image, ref_text = _torch_embeddings(
        reference, torch.from_numpy(pixels).permute(0, 3, 1, 2), torch.from_numpy(tokens).long())
    assert np.max(np.abs(ref_image - image)) <= TOLERANCE
    assert np.max(np.abs(ref_text - text)) <= TOLERANCE

    # A .pt cannot record GELU; the safetensors metadata does (keras_clip reads it).
    kwargs = {"activation": "gelu"} if model.activation == "gelu" and suffix == ".pt" else {}
    reread = CLIP.from_preset(str(path), **kwargs)
    assert reread.activation == model.activation
    _assert_identical_weights(model, reread)


def test_openai_rejects_unknown_suffix(vit_model, tmp_path):
    with pytest.raises(ValueError, match=r"^`path` for format='openai' must end with \.safetensors, "
                       r"\.pt, \.pth or \.bin\. Received: path='.*model\.h5'$"):
        vit_model.save_checkpoint(str(tmp_path / "model.h5"), format="openai")


def test_formats_that_cannot_record_an_epsilon_refuse_it(tmp_path):
    model = CLIP(**dict(VIT, layer_norm_epsilon=1e-6))
    with pytest.raises(ValueError, match=r"^open_clip models use LayerNorm epsilon 1e-5 and cannot "
                       r"record another value\. Received: layer_norm_epsilon=1e-06$"):
        model.save_checkpoint(tmp_path / "oc", format="open_clip")
    # transformers records it: the folder reads back with the same epsilon.
    model.save_checkpoint(tmp_path / "hf", format="hf")
    assert CLIP.from_preset(str(tmp_path / "hf")).layer_norm_epsilon == 1e-6


def test_unknown_format_is_a_clear_error(vit_model, tmp_path):
    with pytest.raises(ValueError, match=r"^`format` must be one of \('open_clip', 'openai', 'hf', "
                       r"'keras_hub'\)\. Received: format='onnx'$"):
        vit_model.save_checkpoint(tmp_path / "x", format="onnx")


# -- Hugging Face -------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_hf_folder_matches_transformers(activation, photos, open_clip_module, tmp_path):
    import torch
    import transformers  # after open_clip_module: its torchvision shim is needed here too

    model = _perturbed_clip(CASES[f"vit_{activation}"], seed=3)
    folder = tmp_path / "hf"
    model.save_checkpoint(folder, format="hf")
    pixels, tokens, image, text = _keras_clip_embeddings(model, photos)

    reference = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    assert reference.config.text_config.hidden_act == activation
    assert reference.config.vision_config.hidden_act == activation
    # backend="pil": transformers' PIL image pipeline, which is OpenAI's (its default
    # torchvision backend resizes in float and differs by up to one level).
    processor = transformers.CLIPProcessor.from_pretrained(str(folder), backend="pil")
    inputs = processor(text=CAPTIONS, images=photos, return_tensors="pt", padding="max_length")
    np.testing.assert_array_equal(inputs["pixel_values"].permute(0, 2, 3, 1).numpy(), pixels)
    # transformers pads with the end token, OpenAI with 0; the ids before are equal.
    np.testing.assert_array_equal(inputs["input_ids"].numpy(), np.where(tokens == 0, 49407, tokens))
    with torch.no_grad():
        ref_image = reference.get_image_features(pixel_values=inputs["pixel_values"])
        ref_text = reference.get_text_features(input_ids=inputs["input_ids"])
    ref_image = getattr(ref_image, "pooler_output", ref_image)
    ref_text = getattr(ref_text, "pooler_output", ref_text)
    ref_image = torch.nn.functional.normalize(ref_image, dim=-1).numpy()
    ref_text = torch.nn.functional.normalize(ref_text, dim=-1).numpy()
    assert np.max(np.abs(ref_image - image)) <= TOLERANCE
    assert np.max(np.abs(ref_text - text)) <= TOLERANCE

    reread = CLIP.from_preset(str(folder))
    assert reread.activation == activation
    _assert_identical_weights(model, reread)


def test_resnet_to_hf_is_a_clear_error(tmp_path):
    model = CLIP(**RESNET)
    with pytest.raises(ValueError, match=r"^Hugging Face transformers has no CLIP class for the "
                       r"modified-ResNet image tower \(its CLIPModel is ViT-only\); write "
                       r"format='open_clip' or 'openai' instead\. Received: "
                       r"vision_architecture='resnet'$"):
        model.save_checkpoint(tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


# -- keras-hub ----------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_keras_hub_round_trip(activation, photos, tmp_path):
    from keras_clip.convert import keras_hub_converter

    model = _perturbed_clip(CASES[f"vit_{activation}"], seed=5)
    pixels, tokens, image, text = _keras_clip_embeddings(model, photos)
    backbone = keras_hub_converter.to_keras_hub(model)

    hub_image = np.asarray(backbone.get_vision_embeddings(pixels))
    hub_text = np.asarray(backbone.get_text_embeddings(tokens))
    hub_image = hub_image / np.linalg.norm(hub_image, axis=-1, keepdims=True)
    hub_text = hub_text / np.linalg.norm(hub_text, axis=-1, keepdims=True)
    assert np.max(np.abs(hub_image - image)) <= TOLERANCE
    assert np.max(np.abs(hub_text - text)) <= TOLERANCE
    hub_logits = np.asarray(backbone({"images": pixels, "token_ids": tokens})["vision_logits"])
    assert np.max(np.abs(hub_logits - 20.0 * image @ text.T)) <= 20.0 * TOLERANCE

    _assert_identical_weights(model, keras_hub_converter.from_keras_hub(backbone))

    # Through a keras-hub preset folder: keras-hub's own loader and preprocessor.
    import keras_hub

    folder = tmp_path / "keras_hub"
    model.save_checkpoint(folder, format="keras_hub")
    preprocessor = keras_hub.models.CLIPPreprocessor.from_preset(str(folder))
    hub_tokens = np.asarray(preprocessor({"prompts": CAPTIONS, "images": None})["token_ids"])
    np.testing.assert_array_equal(hub_tokens, tokens)
    reloaded = keras_hub.models.CLIPBackbone.from_preset(str(folder))
    np.testing.assert_array_equal(np.asarray(reloaded.get_text_embeddings(tokens)),
                                  np.asarray(backbone.get_text_embeddings(tokens)))
    _assert_identical_weights(model, CLIP.from_preset(str(folder)))


def test_keras_hub_rejects_resnet():
    from keras_clip.convert import keras_hub_converter

    with pytest.raises(ValueError, match=r"^keras-hub's CLIPBackbone has a ViT image tower only; it "
                       r"cannot hold a modified ResNet\. Received: vision_architecture='resnet'$"):
        keras_hub_converter.to_keras_hub(CLIP(**RESNET))


def test_missing_keras_hub_names_the_extra(monkeypatch):
    from keras_clip.convert import keras_hub_converter

    monkeypatch.setitem(sys.modules, "keras_hub", None)  # import keras_hub -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'keras_clip\[keras_hub\]'"):
        keras_hub_converter.import_keras_hub()


# -- command line -------------------------------------------------------------------


def test_command_line_converts_a_preset_folder(vit_model, tmp_path):
    preset = tmp_path / "preset"
    vit_model.save_to_preset(str(preset))
    output = tmp_path / "out.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "keras_clip.convert", "--preset", str(preset), "--format", "openai",
         "--output", str(output)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_identical_weights(vit_model, CLIP.from_preset(str(output)))


# -- sigmoid (SigLIP-loss) models ----------------------------------------------------


def test_sigmoid_model_keeps_its_logit_bias_in_open_clip_and_openai_files(photos, open_clip_module, tmp_path):
    import torch

    model = _perturbed_clip(dict(VIT, loss="sigmoid"), seed=5)
    bias = float(model.logit_bias.bias.numpy())
    assert bias != -10.0  # perturbed, so a default cannot pass for the written value
    folder = tmp_path / "open_clip"
    model.save_checkpoint(folder, format="open_clip")
    reference, _, preprocess = open_clip_module.create_model_and_transforms(f"local-dir:{folder}")
    reference.eval()
    assert float(reference.logit_bias.detach()) == bias

    pixels, tokens, _, _ = _keras_clip_embeddings(model, photos)
    with torch.no_grad():  # open_clip's forward: features, exp(logit_scale), logit_bias
        image_features, text_features, scale, ref_bias = reference(
            torch.from_numpy(pixels).permute(0, 3, 1, 2), torch.from_numpy(tokens))
    expected = float(scale.detach()) * image_features.numpy() @ text_features.numpy().T + float(ref_bias.detach())
    logits = np.asarray(model({"images": pixels, "token_ids": tokens})["logits_per_image"])
    np.testing.assert_allclose(logits, expected, atol=1e-4)

    for reread in (CLIP.from_preset(str(folder)), None):
        if reread is None:
            path = tmp_path / "model.safetensors"
            model.save_checkpoint(path, format="openai")
            reread = CLIP.from_preset(str(path))
        assert reread.contrastive_loss == "sigmoid"
        _assert_identical_weights(model, reread)


@pytest.mark.parametrize("format", ["hf", "keras_hub"])
def test_sigmoid_model_is_refused_where_the_format_has_no_bias(format, tmp_path):
    model = CLIP(**dict(VIT, loss="sigmoid"))
    with pytest.raises(ValueError, match=r"no `logit_bias`.*Received: loss='sigmoid'"):
        model.save_checkpoint(tmp_path / "out", format=format)
