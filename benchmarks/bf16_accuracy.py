"""bf16 (and int8) embeddings against float32 on real photos and captions.

Weights: no pretrained CLIP weights are on this machine (no internet), so the model is
ViT-B/32 with open_clip's random initialisation perturbed (`tests.reference_models`),
loaded from an OpenAI-layout checkpoint, unless `--preset` names a local preset or
checkpoint. Data: the first `--count` Flickr8k test photos (224 px, PIL-preprocessed)
with their first caption, and the first `--cifar_count` CIFAR-10 test images.

Reports, for each low-precision mode against float32 (the same weights):
- cosine similarity of image and of text embeddings (min, mean);
- retrieval agreement: for each photo, the caption ranked first among the `--count`
  captions (and for each caption, the photo), same as float32's or not;
- zero-shot agreement on CIFAR-10: top-1 class with OpenAI's 18 CIFAR-10 templates,
  and top-1 accuracy of each mode (near chance with random weights).

Modes: `bfloat16` (`CLIP.with_dtype("bfloat16")`, weights stored in bf16),
`mixed_bfloat16`, and with `--int8` the float32 model after `model.quantize("int8")`
(Keras' int8 weight quantization of Dense and Embedding layers).

    python benchmarks/bf16_accuracy.py [--count 500] [--cifar_count 500] [--int8]
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
from tests import reference_models as ref  # noqa: E402

DATA = next((p / "shared" / "data" for p in ROOT.parents if (p / "shared" / "data").exists()),
            ROOT / "missing")


def embed(model, images, tokens, batch=32):
    import tensorflow as tf

    encode_image = tf.function(lambda x: tf.cast(model.encode_image(x), tf.float32))
    encode_text = tf.function(lambda t: tf.cast(model.encode_text(t, trim=True), tf.float32))
    image = np.concatenate([encode_image(tf.constant(images[i:i + batch])).numpy()
                            for i in range(0, len(images), batch)])
    text = np.concatenate([encode_text(tf.constant(tokens[i:i + 256])).numpy()
                           for i in range(0, len(tokens), 256)])
    return image, text


def cifar10(root, count, image_size):
    from PIL import Image

    import csv

    with open(root / "cifar10_test" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))[:count]]
    images = np.stack([harness.pil_preprocess(Image.open(root / "cifar10_test" / r["path"]).convert("RGB"),
                                              image_size) for r in rows])
    return images.astype("float32"), np.array([int(r["label"]) for r in rows])


def cosine(a, b):
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--cifar_count", type=int, default=500)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args()
    import torch

    import keras_clip
    from keras_clip.zero_shot_data import load_dataset_prompts
    from tests.reference import import_open_clip

    data = pathlib.Path(args.data)
    paths, captions = ref.flickr_samples(data / "flickr8k", args.count)
    images = np.stack([harness.pil_preprocess(p, 224) for p in paths]).astype("float32")
    with tempfile.TemporaryDirectory() as tmp:
        preset = args.preset
        if preset is None:
            torch.save(ref.open_clip_model(import_open_clip(), ref.FULL_VIT_B32).state_dict(),
                       f"{tmp}/m.pt")
            preset = f"{tmp}/m.pt"
        fp32 = keras_clip.CLIP.from_preset(preset)
    tokens = fp32.tokenizer()(captions).numpy()
    cifar_images, cifar_labels = cifar10(data, args.cifar_count, fp32.image_size)
    classes, templates = load_dataset_prompts("cifar10")
    prompts = [t.format(c) for c in classes for t in templates]
    prompt_tokens = fp32.tokenizer()(prompts).numpy()

    modes = {"float32": fp32, "bfloat16": fp32.with_dtype("bfloat16"),
             "mixed_bfloat16": fp32.with_dtype("mixed_bfloat16")}
    if args.int8:  # quantized when its turn comes
        modes["int8 (Keras quantize)"] = fp32.with_dtype("float32")
    print(f"{args.count} Flickr8k test photos + first captions; {len(cifar_labels)} CIFAR-10 test "
          f"images, {len(templates)} templates; weights: "
          f"{args.preset or 'random (perturbed open_clip init), ViT-B/32'}")
    print("| mode | image cosine min / mean | text cosine min / mean | image->text top-1 agreement "
          "| text->image top-1 agreement | CIFAR-10 zero-shot agreement | CIFAR-10 top-1 | s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    ref32 = None
    for name, model in modes.items():
        if name.startswith("int8"):
            model.quantize("int8")
        start = time.perf_counter()
        image, text = embed(model, images, tokens)
        cifar_image, prompt_text = embed(model, cifar_images, prompt_tokens)
        class_text = prompt_text.reshape(len(classes), len(templates), -1).mean(1)
        class_text /= np.linalg.norm(class_text, axis=-1, keepdims=True)
        o = dict(image=image, text=text, zero_shot=(cifar_image @ class_text.T).argmax(-1),
                 i2t=(image @ text.T).argmax(1), t2i=(text @ image.T).argmax(1))
        ref32 = ref32 or o
        ci, ct = cosine(o["image"], ref32["image"]), cosine(o["text"], ref32["text"])
        print(f"| {name} | {ci.min():.5f} / {ci.mean():.5f} | {ct.min():.5f} / {ct.mean():.5f} "
              f"| {np.mean(o['i2t'] == ref32['i2t']):.3f} | {np.mean(o['t2i'] == ref32['t2i']):.3f} "
              f"| {np.mean(o['zero_shot'] == ref32['zero_shot']):.3f} "
              f"| {np.mean(o['zero_shot'] == cifar_labels):.3f} | {time.perf_counter() - start:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
