"""Full-size reference parity: RN50 and ViT-B/32 with random weights vs open_clip.

Builds open_clip's model (OpenAI's architecture) with perturbed random weights, saves
its state dict as an OpenAI-layout `.pt`, loads it with `CLIP.from_preset(path)` and
compares normalised embeddings on Flickr8k test photos and captions.

    python benchmarks/parity_full.py [--count 32]
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--flickr", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    args = parser.parse_args()

    import torch

    import keras_clip

    open_clip = import_open_clip()
    paths, captions = ref.flickr_samples(pathlib.Path(args.flickr), args.count)
    tokens = open_clip.tokenize(captions)
    for name, spec in [("RN50", ref.FULL_RN50), ("ViT-B/32", ref.FULL_VIT_B32)]:
        reference = ref.open_clip_model(open_clip, spec, seed=1)
        images = np.stack([harness.pil_preprocess(p, 224) for p in paths])
        with torch.no_grad():
            ref_image = reference.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2), normalize=True).numpy()
            ref_text = reference.encode_text(tokens, normalize=True).numpy()
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/model.pt"
            torch.save(reference.state_dict(), path)
            start = time.time()
            model = keras_clip.CLIP.from_preset(path)
            load_s = time.time() - start
        image = np.asarray(model.encode_image(images))
        text = np.asarray(model.encode_text(tokens.numpy()))
        same_i2t = np.mean(np.argmax(image @ text.T, 1) == np.argmax(ref_image @ ref_text.T, 1))
        same_t2i = np.mean(np.argmax(text @ image.T, 1) == np.argmax(ref_text @ ref_image.T, 1))
        print(
            f"{name}: {model.count_params():,} params, loaded in {load_s:.1f}s | "
            f"image max|diff| {np.max(np.abs(image - ref_image)):.2e}, "
            f"text max|diff| {np.max(np.abs(text - ref_text)):.2e}, "
            f"argmax agreement i2t {same_i2t:.3f} t2i {same_t2i:.3f} over {len(paths)} pairs"
        )


if __name__ == "__main__":
    main()
