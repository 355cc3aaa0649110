r"""Serve a FUSION model over an OpenAI-compatible HTTP API (fusion_jax/serve/server.py).

  python -m fusion_jax.serve --workdir DIR [--port 8000] [--host 127.0.0.1] [--step N]
      [--dtype bfloat16] [--image_root DIR] [--max_batch 8] [--max_tokens 512]
      [--batch_window_ms 5] [--stream_every 8] [--nowarmup]

DIR is a training workdir (newest checkpoint, or --step) or a model dir written by
import_torch / import_hf (fusion_jax/infer/load.py). Then, e.g.:

  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"messages": [{"role": "user", "content": [{"type": "text", "text": "What is shown?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}],
         "max_tokens": 64}'

Local image files (a path or file:// URL) are served only from under --image_root. Before it
listens, the server compiles a typical request (an image and a short question) at every batch
size (--nowarmup: compile on first use instead). Add "stream": true to a request for
server-sent events as the answer is decoded, every --stream_every tokens.
"""
from __future__ import annotations

from absl import app, flags, logging

from fusion_jax.infer.load import define_loader_flags

FLAGS = flags.FLAGS
define_loader_flags()
flags.DEFINE_string("host", "127.0.0.1", "address to listen on")
flags.DEFINE_integer("port", 8000, "port (0: any free port; the log says which)")
flags.DEFINE_string("image_root", "", "directory local image paths must be inside ('' = none)")
flags.DEFINE_string("served_model_name", "", "model id in responses (default: the dir's name)")
flags.DEFINE_integer("max_batch", 8, "requests per device batch")
flags.DEFINE_integer("max_tokens", 512, "largest max_tokens a request may ask for")
flags.DEFINE_integer("default_max_tokens", 256, "max_tokens when a request names none")
flags.DEFINE_float("batch_window_ms", 5.0, "how long the first request waits for others")
flags.DEFINE_integer("max_body_mb", 32, "request body limit (MiB)")
flags.DEFINE_integer("max_image_mb", 20, "encoded image limit (MiB)")
flags.DEFINE_integer("stream_every", 8, "tokens decoded between the host's looks at the answers "
                     "(streamed deltas, stop strings); fewer: smoother streams, more host syncs")
flags.DEFINE_boolean("warmup", True, "compile a typical request at every batch size before "
                     "listening")


def main(argv) -> None:
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  from fusion_jax.infer.generator import Generator
  from fusion_jax.infer.load import load_model
  from fusion_jax.serve.batcher import Batcher
  from fusion_jax.serve.chat import ChatLimits
  from fusion_jax.serve.server import FusionServer, warm_up
  try:
    model = load_model(FLAGS.workdir, step=FLAGS.step, dtype=FLAGS.dtype,
                       seq_len=FLAGS.seq_len)
    tokenizer = model.tokenizer
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  del tokenizer  # loaded above so a missing tokenizer fails before the server starts
  gen = Generator.for_model(model, max_batch=FLAGS.max_batch, max_new_tokens=FLAGS.max_tokens,
                            stop_check_every=max(FLAGS.stream_every, 1))
  limits = ChatLimits(image_size=model.cfg.vision.image_size, image_root=FLAGS.image_root,
                      max_image_bytes=FLAGS.max_image_mb * 2**20,
                      default_max_tokens=min(FLAGS.default_max_tokens, FLAGS.max_tokens))
  if FLAGS.warmup:
    secs = warm_up(gen, limits, limits.default_max_tokens)
    print(f"warm-up: batch sizes 1..{gen.max_batch} compiled in {sum(secs):.1f} s", flush=True)
  batcher = Batcher(gen, window_s=FLAGS.batch_window_ms / 1000.0)
  server = FusionServer((FLAGS.host, FLAGS.port), batcher,
                        model_name=FLAGS.served_model_name or model.name, limits=limits,
                        max_body_bytes=FLAGS.max_body_mb * 2**20)
  logging.set_verbosity(logging.WARNING)
  print(f"serving {model.name} ({model.kind}, compute dtype {model.cfg.llm.dtype}) at "
        f"{server.url}/v1/chat/completions", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  app.run(main)
