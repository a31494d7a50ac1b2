"""Command line over `serving/client.py`; prints JSON.

    python serving/cli.py --server localhost:8500 status
    python serving/cli.py --server localhost:8500 metadata
    python serving/cli.py --server localhost:8500 classify dog.jpg cat.png
    python serving/cli.py --server localhost:8500 encode_image dog.jpg
    python serving/cli.py --server localhost:8500 encode_text "a dog" "a cat"
    python serving/cli.py --server localhost:8500 --texts "a dog" --texts "a cat" similarity dog.jpg

Exits with status 1 and the server's status code and message on a failed call.
"""
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("server", "127.0.0.1:8500", "host:port of TF Serving or local_server.py.")
flags.DEFINE_string("model_name", "clip", "Served model name.")
flags.DEFINE_integer("version", None, "Model version; default: the latest.")
flags.DEFINE_float("timeout", 30.0, "Seconds per call.")
flags.DEFINE_multi_string("texts", [], "Texts for `similarity`.")

COMMANDS = ("status", "metadata", "encode_image", "encode_text", "classify", "similarity")


def run(client, command, args, texts=()):
    """Runs one command; returns a JSON-serialisable result."""
    def read(paths):
        if not paths:
            raise app.UsageError(f"`{command}` needs at least one image file.")
        images = []
        for path in paths:
            with open(path, "rb") as f:
                images.append(f.read())
        return images

    if command == "status":
        return client.status()
    if command == "metadata":
        return client.metadata()
    if command == "encode_image":
        return client.encode_image(read(args)).tolist()
    if command == "encode_text":
        return client.encode_text(list(args)).tolist()
    if command == "classify":
        result = client.classify(read(args))
        return [
            {"file": path, "top_labels": labels, "top_scores": scores.tolist()}
            for path, labels, scores in zip(args, result["top_labels"], result["top_scores"])
        ]
    if command == "similarity":
        return client.similarity(read(args), list(texts)).tolist()
    raise app.UsageError(f"Unknown command {command!r}; expected one of {COMMANDS}.")


def main(argv):
    if len(argv) < 2:
        raise app.UsageError(f"Give a command: one of {COMMANDS}.")
    from serving.client import ClientError, CLIPClient

    with CLIPClient(FLAGS.server, FLAGS.model_name, FLAGS.version, FLAGS.timeout) as client:
        try:
            result = run(client, argv[1], argv[2:], FLAGS.texts)
        except ClientError as e:
            print(json.dumps({"error": e.code.name, "message": e.details}), file=sys.stderr)
            return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    app.run(main)
