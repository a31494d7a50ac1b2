"""A trained demo model, written for open_clip, scored by open_clip's own code.

Takes a finished `training/run.py` run (its `preset/` and `demo_data/` folders), scores
keras_clip's zero-shot top-1 on the demo's held-out classes (the same evaluation as the
training summary), writes the model with `save_checkpoint(format="open_clip")`, loads it
with `open_clip.create_model_and_transforms("local-dir:...")` and scores the same JPEGs
with open_clip's image transform, tokenizer and OpenAI's prompt-ensemble recipe.

    python training/run.py --steps=300 --model_dir=/tmp/demo
    python benchmarks/demo_open_clip_zero_shot.py --model_dir=/tmp/demo
"""
import argparse
import io
import os
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reference import import_open_clip  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    args = parser.parse_args()

    open_clip = import_open_clip()
    import tensorflow as tf
    import torch
    from PIL import Image

    from keras_clip import CLIP, demo_data
    from keras_clip.zero_shot import ZeroShotClassifier

    model = CLIP.from_preset(os.path.join(args.model_dir, "preset"))
    images, labels, class_names, templates = demo_data.read_demo_zero_shot_split(
        os.path.join(args.model_dir, "demo_data"))
    classifier = ZeroShotClassifier(model, class_names, templates=templates)
    ours = np.concatenate([
        np.argmax(np.asarray(classifier(tf.constant(images[i:i + 256]))), axis=-1)
        for i in range(0, len(images), 256)
    ])

    with tempfile.TemporaryDirectory() as folder:
        model.save_checkpoint(folder, format="open_clip")
        reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    reference.eval()
    with torch.no_grad():
        weights = []
        for name in class_names:
            text = reference.encode_text(tokenizer([t.format(name) for t in templates]), normalize=True)
            mean = text.mean(dim=0)
            weights.append(mean / mean.norm())
        weights = torch.stack(weights)  # (C, E)
        theirs = []
        for i in range(0, len(images), 128):
            batch = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images[i:i + 128]])
            theirs.append((reference.encode_image(batch, normalize=True) @ weights.T).argmax(-1).numpy())
    theirs = np.concatenate(theirs)

    print(f"{len(images)} held-out images, {len(class_names)} classes")
    print(f"keras_clip zero-shot top-1: {100 * np.mean(ours == labels):.2f}%")
    print(f"open_clip (written open_clip folder) top-1: {100 * np.mean(theirs == labels):.2f}%")
    print(f"images where the predictions differ: {int(np.sum(ours != theirs))}")


if __name__ == "__main__":
    main()
