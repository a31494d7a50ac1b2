"""Exports a CLIP preset as a TF Serving SavedModel (see `keras_clip.export`).

    python export/export.py --preset clip_vit_tiny --export_dir /models/clip --version 1 \
        --labels labels.txt --templates imagenet

Writes `<export_dir>/<version>/` (SavedModel with the `encode_image`, `encode_text`,
`similarity` and, with `--labels`, `classify` signatures and warm-up requests), and
`<export_dir>/models.config` and `<export_dir>/batching_parameters.txt` for
`tensorflow_model_server --model_config_file=... --enable_batching
--batching_parameters_file=...`.
"""
from absl import app, flags

import keras_clip
from keras_clip.export import export_saved_model, read_labels

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "clip_vit_tiny", "Preset name or path accepted by CLIP.from_preset.")
flags.DEFINE_string("export_dir", None, "Model base path; the version goes in a subfolder.")
flags.DEFINE_integer("version", 1, "Model version (positive integer).")
flags.DEFINE_string("labels", None, "Text file of class names, one per line; adds `classify`.")
flags.DEFINE_string("templates", None,
                    "Prompt templates: a keras_clip.zero_shot_data name (e.g. imagenet) or a "
                    "file with one template per line. Default: 'a photo of a {}.'")
flags.DEFINE_string("model_name", "clip", "Model name in models.config and warm-up requests.")
flags.DEFINE_integer("top_k", 5, "Labels returned per image by `classify`.")
flags.DEFINE_bool("overwrite", False, "Replace an existing version directory.")
flags.DEFINE_integer("max_image_pixels", None,
                     "Largest image (width x height) the signatures decode; larger ones get "
                     "INVALID_ARGUMENT. Default: the preset's (50 million unless saved otherwise).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "mixed_bfloat16"],  # EXPORT_DTYPES
                  "Dtype policy of the exported towers; bfloat16 stores the weights in bf16 "
                  "(half the size, faster on AVX512-BF16/AMX CPUs). Outputs stay float32. "
                  "Default: the preset's (float32).")
flags.mark_flag_as_required("export_dir")


def main(argv):
    del argv
    overrides = {}
    if FLAGS.max_image_pixels is not None:
        overrides["max_image_pixels"] = FLAGS.max_image_pixels
    model = keras_clip.CLIP.from_preset(FLAGS.preset, **overrides)
    labels = read_labels(FLAGS.labels) if FLAGS.labels else None
    export_saved_model(
        model, FLAGS.export_dir, FLAGS.version, class_names=labels,
        templates=FLAGS.templates, model_name=FLAGS.model_name, top_k=FLAGS.top_k,
        overwrite=FLAGS.overwrite, dtype=FLAGS.dtype,
    )


if __name__ == "__main__":
    app.run(main)
