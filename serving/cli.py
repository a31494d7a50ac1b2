"""Command line over `keras_clip.serving.client`; prints JSON.

    python serving/cli.py --server localhost:8500 status
    python serving/cli.py --server localhost:8500 metadata
    python serving/cli.py --server localhost:8500 classify dog.jpg cat.png
    python serving/cli.py --server localhost:8500 encode_image dog.jpg
    python serving/cli.py --server localhost:8500 encode_text "a dog" "a cat"
    python serving/cli.py --server localhost:8500 --texts "a dog" --texts "a cat" similarity dog.jpg

Exits with status 1 and the server's status code and message on a failed call.
"""
import json
import sys

from absl import app, flags

from keras_clip.serving import protocol
from keras_clip.serving.client import ClientError, CLIPClient

FLAGS = flags.FLAGS
flags.DEFINE_string("server", "127.0.0.1:8500", "host:port of TF Serving or local_server.py.")
flags.DEFINE_string("model_name", "clip", "Served model name.")
flags.DEFINE_integer("version", None, "Model version; default: the latest.")
flags.DEFINE_float("timeout", 30.0, "Deadline in seconds of the command (all requests, retries).")
flags.DEFINE_integer("batch_size", 64, "Most items per request; longer lists are split.")
flags.DEFINE_integer("max_attempts", 4, "Attempts per request when the server is UNAVAILABLE.")
flags.DEFINE_string("tls_root_certs", None, "PEM CA file to trust; enables TLS.")
flags.DEFINE_string("tls_client_key", None, "PEM client key (mutual TLS).")
flags.DEFINE_string("tls_client_cert", None, "PEM client certificate (mutual TLS).")
flags.DEFINE_string("tls_server_name", None, "Name to check the server certificate against.")
flags.DEFINE_multi_string("texts", [], "Texts for `similarity`.")

COMMANDS = ("status", "metadata", protocol.ENCODE_IMAGE, protocol.ENCODE_TEXT, protocol.CLASSIFY,
            protocol.SIMILARITY)


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
    if command == protocol.ENCODE_IMAGE:
        return client.encode_image(read(args)).tolist()
    if command == protocol.ENCODE_TEXT:
        return client.encode_text(list(args)).tolist()
    if command == protocol.CLASSIFY:
        result = client.classify(read(args))
        return [
            {"file": path, protocol.TOP_LABELS: labels, protocol.TOP_SCORES: scores.tolist()}
            for path, labels, scores in zip(args, result[protocol.TOP_LABELS],
                                            result[protocol.TOP_SCORES])
        ]
    if command == protocol.SIMILARITY:
        return client.similarity(read(args), list(texts)).tolist()
    raise app.UsageError(f"Unknown command {command!r}; expected one of {COMMANDS}.")


def main(argv):
    if len(argv) < 2:
        raise app.UsageError(f"Give a command: one of {COMMANDS}.")
    with CLIPClient(FLAGS.server, FLAGS.model_name, FLAGS.version, FLAGS.timeout,
                    batch_size=FLAGS.batch_size, max_attempts=FLAGS.max_attempts,
                    root_certificates=FLAGS.tls_root_certs, private_key=FLAGS.tls_client_key,
                    certificate_chain=FLAGS.tls_client_cert,
                    tls_server_name=FLAGS.tls_server_name) as client:
        try:
            result = run(client, argv[1], argv[2:], FLAGS.texts)
        except ClientError as e:
            print(json.dumps({"error": e.code.name, "message": e.details}), file=sys.stderr)
            return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    app.run(main)
