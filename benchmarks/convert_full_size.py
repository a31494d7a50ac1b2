"""Full-size write -> read round trips: RN50 and ViT-B/32 with perturbed random weights.

For each architecture, builds a keras_clip CLIP, moves every weight off its initial
value, writes it in each format the architecture supports (open_clip folder, OpenAI
`.pt`, Hugging Face folder and keras-hub preset for the ViT), loads each with the
target library's own code and prints the largest absolute difference of normalised
image and text embeddings against keras_clip, then reads each back into keras_clip
and prints the largest absolute weight difference (0 means bit-identical).

Images and captions: the first `--count` Flickr8k test photos with their first
captions when `--flickr` exists, else generated images and fixed captions.

    python benchmarks/convert_full_size.py [--count 8]
"""
import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import harness  # noqa: E402
from tests.reference import import_open_clip  # noqa: E402


def _inputs(args):
    from PIL import Image

    flickr = pathlib.Path(args.flickr)
    if flickr.is_dir():
        from tests import reference_models as ref

        paths, captions = ref.flickr_samples(flickr, args.count)
        return [Image.open(p).convert("RGB") for p in paths], captions, "Flickr8k test"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (240 + 16 * i, 320, 3), dtype=np.uint8))
              for i in range(args.count)]
    captions = [f"a photo of {n} dogs playing in the snow" for n in range(args.count)]
    return images, captions, "generated"


def _max_weight_diff(a, b):
    return max(float(np.max(np.abs(x.numpy() - y.numpy()))) for x, y in zip(a.weights, b.weights))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--flickr", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    args = parser.parse_args()

    open_clip = import_open_clip()
    import torch
    import transformers

    import keras_clip
    from keras_clip import CLIP
    from keras_clip.convert import keras_hub_converter

    images, captions, source = _inputs(args)
    print(f"{len(images)} {source} images and captions; fp32, CPU")
    rows = []
    for preset, name in [("clip_rn50", "RN50"), ("clip_vit_b32", "ViT-B/32")]:
        model = CLIP.from_preset(preset, load_weights=False)
        harness.perturb_weights(model, seed=1)
        pixels = np.stack([np.asarray(model.image_preprocessor()(np.asarray(i)[None]))[0] for i in images])
        tokens = np.asarray(keras_clip.tokenize(captions))
        image = np.asarray(model.encode_image(pixels))
        text = np.asarray(model.encode_text(tokens))
        torch_pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2)

        def compare(fmt, ref_image, ref_text, path, reread_kwargs=None, started=None):
            reread = CLIP.from_preset(str(path), **(reread_kwargs or {}))
            rows.append((name, fmt, float(np.max(np.abs(ref_image - image))),
                         float(np.max(np.abs(ref_text - text))), _max_weight_diff(model, reread),
                         time.time() - started))
            print("%-8s %-10s image %.2e  text %.2e  read-back weights %.1e  (%.0f s)" % rows[-1],
                  flush=True)

        with tempfile.TemporaryDirectory() as tmp:
            tmp = pathlib.Path(tmp)
            # open_clip: its local-dir loader, tokenizer and transform.
            started = time.time()
            model.save_checkpoint(tmp / "open_clip", format="open_clip")
            ref, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp / 'open_clip'}")
            ref.eval()
            ref_tokens = open_clip.get_tokenizer(f"local-dir:{tmp / 'open_clip'}")(captions)
            with torch.no_grad():
                ref_pixels = torch.stack([preprocess(i) for i in images])
                ref_image = ref.encode_image(ref_pixels, normalize=True).numpy()
                ref_text = ref.encode_text(ref_tokens, normalize=True).numpy()
            print(f"  open_clip pixels equal: {bool((ref_pixels.permute(0, 2, 3, 1).numpy() == pixels).all())}, "
                  f"tokens equal: {bool((ref_tokens.numpy() == tokens).all())}")
            compare("open_clip", ref_image, ref_text, tmp / "open_clip", started=started)
            del ref

            # OpenAI layout: open_clip's copy of OpenAI's build_model infers the architecture.
            started = time.time()
            model.save_checkpoint(tmp / "model.pt", format="openai")
            state = torch.load(tmp / "model.pt", weights_only=True)
            ref = open_clip.model.build_model_from_openai_state_dict(dict(state))
            with torch.no_grad():
                fp16_image = ref.float().eval().encode_image(torch_pixels, normalize=True).numpy()
                fp16_text = ref.encode_text(torch.from_numpy(tokens).long(), normalize=True).numpy()
            print(f"  OpenAI build_model as is (weights rounded to fp16): image "
                  f"{np.max(np.abs(fp16_image - image)):.2e} text {np.max(np.abs(fp16_text - text)):.2e}")
            ref.load_state_dict(state, strict=True)
            with torch.no_grad():
                ref_image = ref.encode_image(torch_pixels, normalize=True).numpy()
                ref_text = ref.encode_text(torch.from_numpy(tokens).long(), normalize=True).numpy()
            compare("openai .pt", ref_image, ref_text, tmp / "model.pt", started=started)
            del ref, state

            if model.vision_architecture == "vit":
                started = time.time()
                model.save_checkpoint(tmp / "hf", format="hf")
                ref = transformers.CLIPModel.from_pretrained(str(tmp / "hf")).eval()
                processor = transformers.CLIPProcessor.from_pretrained(str(tmp / "hf"), backend="pil")
                inputs = processor(text=captions, images=images, return_tensors="pt", padding="max_length")
                pix_diff = np.max(np.abs(inputs["pixel_values"].permute(0, 2, 3, 1).numpy() - pixels))
                print(f"  transformers (PIL backend) pixels max diff: {pix_diff:.3g}")
                with torch.no_grad():
                    # keras_clip's pixels: the difference measured is the model's alone.
                    ref_image = ref.get_image_features(pixel_values=torch_pixels)
                    ref_text = ref.get_text_features(input_ids=inputs["input_ids"])
                ref_image = getattr(ref_image, "pooler_output", ref_image)
                ref_text = getattr(ref_text, "pooler_output", ref_text)
                ref_image = torch.nn.functional.normalize(ref_image, dim=-1).numpy()
                ref_text = torch.nn.functional.normalize(ref_text, dim=-1).numpy()
                compare("hf", ref_image, ref_text, tmp / "hf", started=started)
                del ref

                started = time.time()
                model.save_checkpoint(tmp / "keras_hub", format="keras_hub")
                import keras_hub

                hub = keras_hub.models.CLIPBackbone.from_preset(str(tmp / "keras_hub"))
                hub_image = np.asarray(hub.get_vision_embeddings(pixels))
                hub_text = np.asarray(hub.get_text_embeddings(tokens))
                hub_image = hub_image / np.linalg.norm(hub_image, axis=-1, keepdims=True)
                hub_text = hub_text / np.linalg.norm(hub_text, axis=-1, keepdims=True)
                compare("keras_hub", hub_image, hub_text, tmp / "keras_hub", started=started)
                del hub
                back = keras_hub_converter.from_keras_hub(keras_hub_converter.to_keras_hub(model))
                print(f"  keras_clip -> CLIPBackbone -> keras_clip in memory: weights max diff "
                      f"{_max_weight_diff(model, back):.1e}")
        del model

    print("\n| model | format | image emb. max abs diff | text emb. max abs diff | read-back weights max abs diff |")
    print("|---|---|---|---|---|")
    for name, fmt, di, dt, dw, _ in rows:
        print(f"| {name} | {fmt} | {di:.2e} | {dt:.2e} | {dw:.1e} |")


if __name__ == "__main__":
    main()
