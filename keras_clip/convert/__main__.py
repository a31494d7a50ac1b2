"""Command line: convert a keras_clip preset or checkpoint to another library's format.

    python -m keras_clip.convert --preset clip_vit_b32_openai --format hf --output ViT-B-32-hf
    python -m keras_clip.convert --preset ./my_preset --format open_clip --output ./my_open_clip
    python -m keras_clip.convert --preset ./my_preset --format openai --output model.safetensors

`--preset` takes anything `CLIP.from_preset` accepts (a built-in name, a keras_clip
preset folder, an OpenAI/open_clip file, a Hugging Face or keras-hub folder, hf://).
"""
from absl import flags, logging

from keras_clip.convert import writers

# Its own flag set, so that importing it beside another module with absl flags of the
# same names (`preset`, ...) cannot collide in absl's global set.
FLAGS = flags.FlagValues()
flags.DEFINE_string("preset", None, "Preset name, folder or checkpoint file to read.",
                    flag_values=FLAGS)
flags.DEFINE_enum("format", None, list(writers.FORMATS), "Format to write.", flag_values=FLAGS)
flags.DEFINE_string("output", None, "File (openai) or folder (open_clip, hf, keras_hub) to write.",
                    flag_values=FLAGS)
flags.DEFINE_enum("activation", None, ["quick_gelu", "gelu"],
                  "Override the activation when --preset is a file that does not record it.",
                  flag_values=FLAGS)
flags.mark_flags_as_required(["preset", "format", "output"], flag_values=FLAGS)


def main(argv):
    del argv
    kwargs = {"activation": FLAGS.activation} if FLAGS.activation else {}
    for path in writers.convert(FLAGS.preset, FLAGS.format, FLAGS.output, **kwargs):
        logging.info("wrote %s", path)


if __name__ == "__main__":
    from keras_clip import cli

    cli.run(main, FLAGS)
