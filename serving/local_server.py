"""Serve exported CLIP SavedModels with the local TF Serving stand-in.

    python serving/local_server.py --model_name clip --model_base_path /models/clip --port 8500

Thin entry point over `keras_clip.serving.local_server` (what it implements, its
limits and error codes are described there). Prints `READY host:port` once the
server listens.
"""
from absl import app, flags, logging

from keras_clip.serving import local_server, protocol

FLAGS = flags.FLAGS
flags.DEFINE_string("model_name", "clip", "The only model name requests may use.")
flags.DEFINE_string("model_base_path", None, "Folder of numbered SavedModel versions.")
flags.DEFINE_integer("port", 8500, "gRPC port (0 picks a free one).")
flags.DEFINE_string("host", "127.0.0.1",
                    "Interface to listen on; loopback by default. Use 0.0.0.0 only on a "
                    "trusted network, and with --tls_cert_file/--tls_key_file.")
flags.DEFINE_integer("max_workers", None,
                     "gRPC handler threads; more concurrent calls get RESOURCE_EXHAUSTED. "
                     "Default: max_concurrent_calls + max_queue_size + 4.")
flags.DEFINE_integer("max_concurrent_calls", protocol.DEFAULT_MAX_CONCURRENT_CALLS,
                     "TensorFlow calls run at once.")
flags.DEFINE_integer("max_queue_size", protocol.DEFAULT_MAX_QUEUE_SIZE,
                     "Predict requests waiting for a free call; more get UNAVAILABLE.")
flags.DEFINE_integer("max_batch_size", protocol.DEFAULT_MAX_BATCH_SIZE,
                     "Most elements in one input tensor; more get INVALID_ARGUMENT.")
flags.DEFINE_integer("max_message_bytes", protocol.DEFAULT_MAX_MESSAGE_BYTES,
                     "Largest gRPC request or response; larger get RESOURCE_EXHAUSTED.")
flags.DEFINE_string("tls_cert_file", None, "PEM certificate chain; enables TLS.")
flags.DEFINE_string("tls_key_file", None, "PEM private key of --tls_cert_file.")
flags.DEFINE_string("tls_client_ca_file", None,
                    "PEM CA certificates; clients must then present a certificate "
                    "signed by one (mutual TLS).")
flags.mark_flag_as_required("model_base_path")


def main(argv):
    del argv
    server, port = local_server.create_server(
        FLAGS.model_name, FLAGS.model_base_path, FLAGS.port, host=FLAGS.host,
        max_workers=FLAGS.max_workers, max_concurrent_calls=FLAGS.max_concurrent_calls,
        max_message_bytes=FLAGS.max_message_bytes, max_batch_size=FLAGS.max_batch_size,
        max_queue_size=FLAGS.max_queue_size, tls_cert_file=FLAGS.tls_cert_file,
        tls_key_file=FLAGS.tls_key_file, tls_client_ca_file=FLAGS.tls_client_ca_file,
    )
    server.start()
    logging.info("Serving %s from %s on %s:%d", FLAGS.model_name, FLAGS.model_base_path,
                 FLAGS.host, port)
    print(f"READY {FLAGS.host}:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    app.run(main)
