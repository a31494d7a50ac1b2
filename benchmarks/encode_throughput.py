"""Image/text encoding throughput: keras_clip vs open_clip, same weights, same machine.

Random weights (an open_clip model saved as an OpenAI-layout checkpoint and loaded
into keras_clip), real Flickr8k photos and captions. Batch 32 images / 256 texts.
Prints items/s for each and the ratio to open_clip fp32. bf16 rows: keras_clip with
the `mixed_bfloat16` policy, open_clip under `torch.autocast("cpu", torch.bfloat16)`.
keras_clip's text encoder trims each batch to its longest sequence (exact, since the
mask is causal); open_clip always runs all 77 positions.

    python benchmarks/encode_throughput.py [--models RN50 ViT-B/32] [--repeats 5]
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
from tests.reference import import_open_clip  # noqa: E402

SPECS = {"RN50": ref.FULL_RN50, "ViT-B/32": ref.FULL_VIT_B32}


def _time(fn, repeats):
    fn()  # warm-up (graph tracing, oneDNN primitive creation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(SPECS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image_batch", type=int, default=32)
    parser.add_argument("--text_batch", type=int, default=256)
    parser.add_argument("--flickr", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    args = parser.parse_args()

    import tensorflow as tf
    import torch

    import keras_clip

    torch.set_num_threads(tf.config.threading.get_intra_op_parallelism_threads() or 2)
    open_clip = import_open_clip()
    paths, _ = ref.flickr_samples(pathlib.Path(args.flickr), args.image_batch)
    _, captions = ref.flickr_samples(pathlib.Path(args.flickr), args.text_batch, split="train")
    images = np.stack([harness.pil_preprocess(p, 224) for p in paths]).astype("float32")
    tokens = open_clip.tokenize(captions)
    print(f"torch threads {torch.get_num_threads()}, image batch {len(images)}, text batch {len(captions)}")

    for name in args.models:
        reference = ref.open_clip_model(open_clip, SPECS[name])
        torch_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            t_img = _time(lambda: reference.encode_image(torch_images), args.repeats)
            t_txt = _time(lambda: reference.encode_text(tokens), args.repeats)
        rows = [("open_clip fp32", t_img, t_txt)]
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            b_img = _time(lambda: reference.encode_image(torch_images), args.repeats)
            b_txt = _time(lambda: reference.encode_text(tokens), args.repeats)
        rows.append(("open_clip bf16", b_img, b_txt))
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(reference.state_dict(), f"{tmp}/m.pt")
            for label, dtype in [("keras_clip fp32", "float32"), ("keras_clip bf16", "mixed_bfloat16")]:
                model = keras_clip.CLIP.from_preset(f"{tmp}/m.pt", dtype=dtype)
                encode_image = tf.function(lambda x, m=model: m.encode_image(x))
                encode_text = tf.function(lambda t, m=model: m.encode_text(t, trim=True))
                tf_images, tf_tokens = tf.constant(images), tf.constant(tokens.numpy())
                k_img = _time(lambda: encode_image(tf_images).numpy(), args.repeats)
                k_txt = _time(lambda: encode_text(tf_tokens).numpy(), args.repeats)
                rows.append((label, k_img, k_txt))
        for label, ti, tt in rows:
            print(f"{name:9s} {label:16s} images/s {len(images) / ti:8.1f} "
                  f"(x{t_img / ti:4.2f})   texts/s {len(captions) / tt:8.1f} (x{t_txt / tt:4.2f})")


if __name__ == "__main__":
    main()
