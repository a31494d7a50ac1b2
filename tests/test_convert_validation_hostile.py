"""Crafted state dicts are rejected before any model is built: quickly, with no large
allocation, and with a CheckpointError that names the offending key."""
import json
import time
import tracemalloc

import numpy as np
import pytest

from keras_clip import CLIP
from keras_clip.convert import CheckpointError, huggingface, openai

TEXT, VISION, EMBED, MLP = 64, 64, 32, 128


def _block(prefix, width=TEXT, mlp=MLP):
    shapes = {
        "ln_1.weight": (width,), "ln_1.bias": (width,),
        "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
        "ln_2.weight": (width,), "ln_2.bias": (width,),
        "mlp.c_fc.weight": (mlp, width), "mlp.c_fc.bias": (mlp,),
        "mlp.c_proj.weight": (width, mlp), "mlp.c_proj.bias": (width,),
    }
    return {f"{prefix}{name}": np.full(shape, 0.01, np.float32) for name, shape in shapes.items()}


def tiny_vit_state_dict(text_width=TEXT, vision_width=VISION):
    """A complete OpenAI-layout ViT CLIP: 2+2 layers, 16px images, 8px patches."""
    f = lambda *shape: np.full(shape, 0.01, np.float32)  # noqa: E731
    sd = {
        "text_projection": f(text_width, EMBED), "positional_embedding": f(8, text_width),
        "token_embedding.weight": f(100, text_width), "ln_final.weight": f(text_width),
        "ln_final.bias": f(text_width), "logit_scale": np.array(2.9957, np.float32),
        "visual.conv1.weight": f(vision_width, 3, 8, 8), "visual.class_embedding": f(vision_width),
        "visual.positional_embedding": f(5, vision_width), "visual.proj": f(vision_width, EMBED),
        "visual.ln_pre.weight": f(vision_width), "visual.ln_pre.bias": f(vision_width),
        "visual.ln_post.weight": f(vision_width), "visual.ln_post.bias": f(vision_width),
    }
    for i in range(2):
        sd.update(_block(f"transformer.resblocks.{i}.", text_width))
        sd.update(_block(f"visual.transformer.resblocks.{i}.", vision_width))
    return sd


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails the test if a CLIP model is constructed."""
    built = []

    def refuse(self, *args, **kwargs):
        built.append(kwargs)
        raise AssertionError(f"a CLIP model was built: {kwargs}")

    monkeypatch.setattr(CLIP, "__init__", refuse)
    return built


def _save(sd, tmp_path, name="model.safetensors"):
    from safetensors.numpy import save_file

    path = tmp_path / name
    save_file(sd, str(path))
    return str(path)


def _reject(path):
    """from_preset(path) -> (CheckpointError message, seconds, peak traced bytes).

    Timed without tracemalloc (it slows every allocation); the peak comes from a second call.
    """
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        CLIP.from_preset(path)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError):
            CLIP.from_preset(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return str(info.value), seconds, peak


def test_valid_tiny_state_dict_gives_its_config():
    config = openai.config_from_state_dict(tiny_vit_state_dict())
    assert config == dict(
        vision_architecture="vit", vision_hidden_dim=64, vision_patch_size=8, vision_num_layers=2,
        image_size=16, vision_num_heads=1, vision_intermediate_dim=128, embed_dim=32,
        context_length=8, vocabulary_size=100, text_hidden_dim=64, text_num_heads=1,
        text_num_layers=2, text_intermediate_dim=128, initial_logit_scale=pytest.approx(20.0, rel=1e-4),
    )


def test_tens_of_thousands_of_fake_blocks_rejected_fast_without_building(tmp_path, no_model_built):
    sd = tiny_vit_state_dict()
    for i in range(2, 30_000):
        sd[f"transformer.resblocks.{i}.ln_1.weight"] = np.zeros(1, np.float32)
    path = _save(sd, tmp_path)
    message, seconds, peak = _reject(path)
    assert message == (
        f"Checkpoint {path} holds 30060 tensors, more than the limit of 10000 "
        "(keras_clip.convert.checkpoint.MAX_TENSORS); no CLIP has that many"
    )
    assert seconds < 5.0
    assert peak < 100 * 2**20
    assert no_model_built == []


def test_thousands_of_fake_blocks_under_the_tensor_limit(tmp_path, no_model_built):
    sd = tiny_vit_state_dict()
    for i in range(2, 5_000):
        sd[f"transformer.resblocks.{i}.ln_1.weight"] = np.zeros(1, np.float32)
    message, seconds, peak = _reject(_save(sd, tmp_path))
    assert message == (
        "Unsupported checkpoint: the text tower has 5000 blocks (`transformer.resblocks.0..4999`), "
        "more than the limit of 256 (keras_clip.convert.openai.MAX_NUM_LAYERS)"
    )
    assert seconds < 5.0
    assert peak < 100 * 2**20
    assert no_model_built == []


def test_fake_blocks_under_the_limit_must_be_complete(no_model_built):
    sd = tiny_vit_state_dict()
    for i in range(2, 200):
        sd[f"transformer.resblocks.{i}.ln_1.weight"] = np.zeros(1, np.float32)
    with pytest.raises(CheckpointError) as info:
        openai.config_from_state_dict(sd)
    assert str(info.value) == (
        "Inconsistent checkpoint: `transformer.resblocks.2.ln_1.weight` must have shape (64,) "
        "to match the rest of the text tower; Received: shape (1,)"
    )
    sd = tiny_vit_state_dict()
    sd.update({k.replace(".1.", ".2."): v for k, v in _block("transformer.resblocks.1.").items()})
    del sd["visual.transformer.resblocks.1.mlp.c_proj.bias"]
    with pytest.raises(CheckpointError) as info:
        openai.config_from_state_dict(sd)
    assert str(info.value) == (
        "Unsupported checkpoint: the ViT image tower needs "
        "`visual.transformer.resblocks.1.mlp.c_proj.bias`, which is missing"
    )


def test_block_indices_must_be_contiguous(no_model_built):
    sd = tiny_vit_state_dict()
    sd.update(_block("transformer.resblocks.5."))
    with pytest.raises(CheckpointError) as info:
        openai.config_from_state_dict(sd)
    assert str(info.value) == (
        "Unsupported checkpoint: the text tower block indices must run 0..N-1 without gaps; "
        "`transformer.resblocks.2.*` is missing (found 3 blocks, highest index 5)"
    )
    sd = tiny_vit_state_dict()
    sd["transformer.resblocks.1e9.ln_1.weight"] = np.zeros(1, np.float32)
    with pytest.raises(CheckpointError) as info:
        openai.config_from_state_dict(sd)
    assert str(info.value) == (
        "Unsupported checkpoint: `transformer.resblocks.1e9.ln_1.weight` has a block index that "
        "is not a plain integer; Received: '1e9'"
    )


def test_one_dimensional_text_projection(tmp_path, no_model_built):
    sd = tiny_vit_state_dict()
    sd["text_projection"] = np.zeros(EMBED, np.float32)
    message, seconds, peak = _reject(_save(sd, tmp_path))
    assert message == (
        "Unsupported checkpoint: `text_projection` must be a 2-D tensor (text width x embedding "
        "dim) with no empty dimension; Received: shape (32,)"
    )
    assert seconds < 5.0 and peak < 100 * 2**20


def test_missing_patch_embedding(tmp_path, no_model_built):
    sd = tiny_vit_state_dict()
    del sd["visual.conv1.weight"]
    message, seconds, peak = _reject(_save(sd, tmp_path))
    assert message == (
        "Unsupported checkpoint: the ViT image tower needs `visual.conv1.weight`, which is missing"
    )
    assert seconds < 5.0 and peak < 100 * 2**20


@pytest.mark.parametrize(
    "text_width, vision_width, message",
    [
        (32, VISION,
         "Unsupported checkpoint: the text tower width 32 (from `ln_final.weight`) gives 0 "
         "attention heads under OpenAI's rule heads = width // 64; the width must be at least "
         "64 and divisible by its head count. Received: width=32"),
        (TEXT, 48,
         "Unsupported checkpoint: the ViT image tower width 48 (from `visual.conv1.weight`) gives "
         "0 attention heads under OpenAI's rule heads = width // 64; the width must be at least "
         "64 and divisible by its head count. Received: width=48"),
        (129, VISION,
         "Unsupported checkpoint: the text tower width 129 (from `ln_final.weight`) gives 2 "
         "attention heads under OpenAI's rule heads = width // 64; the width must be at least "
         "64 and divisible by its head count. Received: width=129"),
    ],
)
def test_widths_without_whole_heads(text_width, vision_width, message, tmp_path, no_model_built):
    sd = tiny_vit_state_dict(text_width=text_width, vision_width=vision_width)
    got, seconds, _ = _reject(_save(sd, tmp_path))
    assert got == message
    assert seconds < 5.0


def test_absurd_width_rejected_before_other_tensors_are_read(no_model_built):
    sd = tiny_vit_state_dict()
    sd["ln_final.weight"] = np.zeros(100_000, np.float32)
    with pytest.raises(CheckpointError) as info:
        openai.config_from_state_dict(sd)
    assert str(info.value) == (
        "Unsupported checkpoint: a text width of 100000 (from `ln_final.weight`) exceeds the "
        "limit of 16384 (keras_clip.convert.openai.MAX_HIDDEN_DIM)"
    )


def test_non_finite_logit_scale(no_model_built):
    sd = tiny_vit_state_dict()
    sd["logit_scale"] = np.array([1e6], np.float32)
    with pytest.raises(CheckpointError) as info:
        openai.config_from_state_dict(sd)
    assert str(info.value) == (
        "Unsupported checkpoint: `logit_scale` must be one finite number (log of the "
        "temperature); Received: shape (1,)"
    )


def test_valid_tiny_state_dict_still_loads(tmp_path):
    model = CLIP.from_preset(_save(tiny_vit_state_dict(), tmp_path))
    assert (model.text_num_layers, model.vision_num_layers, model.image_size) == (2, 2, 16)
    np.testing.assert_allclose(np.asarray(model.text.text_projection), 0.01)


# ---- Hugging Face folders: config.json is checked against the weights -----------------


def _hf_folder(tmp_path, **text_overrides):
    """A tiny transformers CLIPModel folder (the open_clip_module fixture makes its import work)."""
    import torch
    import transformers

    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, vocab_size=100),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=16),
        projection_dim=32,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(tmp_path / "hf", safe_serialization=True)
    config_path = tmp_path / "hf" / "config.json"
    data = json.loads(config_path.read_text())
    data["text_config"].update(text_overrides)
    config_path.write_text(json.dumps(data))
    return str(tmp_path / "hf")


def test_hugging_face_config_must_match_weights_before_building(tmp_path, open_clip_module, no_model_built):
    folder = _hf_folder(tmp_path, num_hidden_layers=200)
    with pytest.raises(CheckpointError) as info:
        CLIP.from_preset(folder)
    assert str(info.value) == (
        "Hugging Face config.json disagrees with the weights: `text_num_layers` is 200 in "
        "config.json but 2 in the weights"
    )


def test_hugging_face_config_alone_cannot_describe_a_huge_model(tmp_path, open_clip_module, no_model_built):
    folder = _hf_folder(tmp_path, num_hidden_layers=100_000, hidden_size=1024, num_attention_heads=16)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        CLIP.from_preset(folder, load_weights=False)
    assert time.perf_counter() - start < 5.0
    assert str(info.value).startswith("Hugging Face config.json describes a model of about ")
    assert str(info.value).endswith(
        "parameters, more than the limit of 5,000,000,000 "
        "(keras_clip.convert.huggingface.MAX_CONFIG_PARAMETERS)"
    )
    assert huggingface.MAX_CONFIG_PARAMETERS == 5_000_000_000
