"""`mmv-tf export`, `mmv-tf serve`, `mmv-tf query` (see docs/serving.md)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading


# -- export ----------------------------------------------------------------------------------------------

def _export_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model_dir", required=True, help="trained model dir (model_config.json, ckpt-*, vocab.txt)")
  parser.add_argument("--export_dir", required=True,
                      help="model base path; the SavedModel goes to EXPORT_DIR/<version>/")
  parser.add_argument("--version", type=int, default=None, help="version number (default: newest + 1); "
                      "an existing version is never overwritten")
  parser.add_argument("--checkpoint", default=None, help="checkpoint path (default: latest in model_dir)")
  parser.add_argument("--model_name", default="mmv", help="model name written into warmup requests")
  parser.add_argument("--no_warmup", action="store_true", help="do not write tf_serving_warmup_requests")
  parser.add_argument("--no_image_signatures", action="store_true",
                      help="omit the deflated image / image_bytes signatures")
  # No argparse `choices`: mmv_tf.precision.check_precision gives the one error message for every entry point.
  parser.add_argument("--precision", default="float32",
                      help="compute precision inside the graphs: float32 (default) or bfloat16 (Keras "
                      "mixed_bfloat16: float32 inputs/outputs, BN statistics and log-mel; faster on CPUs "
                      "with AMX, see docs/serving.md)")


def _export_run(args) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  from mmv_tf import precision
  from mmv_tf.serving import export, ops_allowlist
  try:
    precision.check_precision(args.precision)
  except ValueError as e:
    print(f"mmv-tf export: --precision: {e}", file=sys.stderr)
    return 2
  if args.precision == "bfloat16":
    logging.info("bfloat16 export on %s", precision.cpu_bf16_support().describe())
  try:
    path = export.export_from_model_dir(model_dir=args.model_dir, export_base=args.export_dir,
                                        version=args.version, warmup=not args.no_warmup,
                                        model_name=args.model_name, checkpoint=args.checkpoint,
                                        image_signatures=not args.no_image_signatures,
                                        precision=args.precision)
  except (FileExistsError, FileNotFoundError, ops_allowlist.DisallowedOpsError) as e:
    print(f"mmv-tf export: {e}", file=sys.stderr)
    return 1
  with open(f"{path}/assets.extra/{export.EXPORT_INFO}") as f:
    info = json.load(f)
  print(f"exported {path} (precision {info.get('precision', 'float32')})")
  for name, sig in info["signatures"].items():
    i = sig["input"]
    print(f"  {name:<18} {i['name']}: {i['dtype']} {i['shape']} -> {', '.join(sig['outputs'])}")
  return 0


# -- serve -----------------------------------------------------------------------------------------------

def _serve_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--port", type=int, default=8500, help="gRPC port (0: any free port)")
  parser.add_argument("--rest_api_port", type=int, default=8501, help="REST port (0: any free port; -1: none)")
  parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server)")
  parser.add_argument("--model_name", default="mmv")
  parser.add_argument("--model_base_path", required=True, help="dir holding integer version dirs")
  parser.add_argument("--enable_batching", action="store_true", help="batch concurrent requests")
  parser.add_argument("--batching_parameters_file", default=None,
                      help="BatchingParameters textproto (e.g. export/batching_parameters.txt)")
  parser.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                      help="seconds between polls for new versions (0: poll once at start)")
  parser.add_argument("--enable_model_warmup", type=lambda s: s.lower() in ("1", "true", "yes"),
                      default=True, help="replay assets.extra/tf_serving_warmup_requests on load")
  parser.add_argument("--num_request_iterations_for_warmup", type=int, default=1)
  parser.add_argument("--max_request_bytes", type=int, default=64 << 20)
  parser.add_argument("--max_tensor_elements", type=int, default=1 << 24)
  parser.add_argument("--max_batch_rows", type=int, default=256)
  parser.add_argument("--max_concurrent_requests", type=int, default=32)
  parser.add_argument("--serve_seconds", type=float, default=None,
                      help="stop by itself after this many seconds (tests, demos)")


def options_from_args(args):
  from mmv_tf.serving import batching, server
  params = None
  if args.batching_parameters_file:
    params = batching.BatchingParameters.from_file(args.batching_parameters_file)
  return server.ServerOptions(
      model_name=args.model_name, model_base_path=args.model_base_path, host=args.host, port=args.port,
      rest_api_port=args.rest_api_port, enable_batching=args.enable_batching, batching_parameters=params,
      file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
      enable_model_warmup=args.enable_model_warmup,
      num_request_iterations_for_warmup=args.num_request_iterations_for_warmup,
      max_request_bytes=args.max_request_bytes, max_tensor_elements=args.max_tensor_elements,
      max_batch_rows=args.max_batch_rows, max_concurrent_requests=args.max_concurrent_requests)


def _serve_run(args) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  from mmv_tf.serving import server
  options = options_from_args(args)
  srv = server.ModelServer(options)
  grpc_port, rest_port = srv.start()
  current = srv.manager.current
  version = current.version if current else None
  # One machine-readable line (tests and scripts read the ports from it).
  print(json.dumps({"event": "serving", "model_name": options.model_name, "version": version,
                    "precision": current.precision if current else None,
                    "host": options.host, "grpc_port": grpc_port, "rest_api_port": rest_port}), flush=True)
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  stop.wait(args.serve_seconds)
  srv.stop()
  print(json.dumps({"event": "stopped"}), flush=True)
  return 0


# -- query -----------------------------------------------------------------------------------------------

def _query_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--server", default="127.0.0.1:8500", help="HOST:PORT of the gRPC API")
  parser.add_argument("--model_name", default="mmv")
  parser.add_argument("--video", action="append", default=[], help="video file (repeatable)")
  parser.add_argument("--image", action="append", default=[], help="image file (repeatable)")
  parser.add_argument("--audio", action="append", default=[], help="audio (or video) file (repeatable)")
  parser.add_argument("--text", action="append", default=[], help="sentence (repeatable)")
  parser.add_argument("--num_frames", type=int, default=None,
                      help="frames per clip (default: from the signature metadata, else 32)")
  parser.add_argument("--fps", type=float, default=10.0, help="frame rate of the sampled clip")
  parser.add_argument("--size", type=int, default=None,
                      help="frame/image size (default: from the signature metadata if static, else 200; "
                      "use the model's crop_size, e.g. 32 for the tiny models)")
  parser.add_argument("--audio_seconds", type=float, default=None,
                      help="audio window (default: num_frames / fps)")
  parser.add_argument("--sample_rate", type=int, default=48000)
  parser.add_argument("--image_bytes", action="store_true",
                      help="send images as encoded bytes to `image_bytes` (decoded in-graph)")
  parser.add_argument("--space", default=None,
                      help="the output to compare modalities in (default: chosen from the served signatures' "
                      "outputs, see docs/serving.md; needed when a pair shares several, e.g. BraVe)")
  parser.add_argument("--json", action="store_true", help="print embeddings as JSON")
  parser.add_argument("--timeout", type=float, default=120.0)


def _query_run(args) -> int:
  import grpc
  import numpy as np
  from mmv_tf.serving import client as client_lib

  if not (args.video or args.image or args.audio or args.text):
    print("mmv-tf query: give at least one of --video, --image, --audio, --text", file=sys.stderr)
    return 2
  client = client_lib.ServingClient(server=args.server, model_name=args.model_name, timeout=args.timeout)
  try:
    sigs = client.signatures()
    video_shape = sigs.get("video", {}).get("inputs", {}).get("video", (None, (-1,) * 5))[1]
    num_frames = args.num_frames or (video_shape[1] if video_shape[1] > 0 else 32)
    size = args.size or (video_shape[2] if video_shape[2] > 0 else 200)
    audio_seconds = args.audio_seconds or num_frames / args.fps
    embeddings = {}  # modality -> (labels, {output: array})
    if args.video:
      clips = np.stack([client_lib.read_video(p, num_frames=num_frames, fps=args.fps, size=size)
                        for p in args.video])
      embeddings["video"] = (args.video, client.embed_video(clips))
    if args.image:
      if args.image_bytes:
        data = [open(p, "rb").read() for p in args.image]
        embeddings["image"] = (args.image, client.embed_image_bytes(data))
      else:
        images = np.stack([client_lib.read_image(p, size=size) for p in args.image])
        embeddings["image"] = (args.image, client.embed_image(images))
    if args.audio:
      waves = np.stack([client_lib.read_audio(p, sample_rate=args.sample_rate, seconds=audio_seconds)
                        for p in args.audio])
      embeddings["audio"] = (args.audio, client.embed_audio(waves))
    if args.text:
      embeddings["text"] = (args.text, client.embed_text(args.text))
  except grpc.RpcError as e:
    print(f"mmv-tf query: {e.code().name}: {e.details()}", file=sys.stderr)
    return 1
  finally:
    client.close()

  if args.json:
    print(json.dumps({m: {"inputs": labels, **{k: v.tolist() for k, v in outs.items()}}
                      for m, (labels, outs) in embeddings.items()}))
    return 0
  modalities = list(embeddings)
  # The modality signatures' outputs decide the space of each pair (client_lib.shared_space).
  outputs = {m: list(sigs[name]["outputs"]) for m, name in (("video", "video"), ("audio", "audio"), ("text", "text"),
             ("image", "image_bytes"), ("image", "image")) if name in sigs}
  if len(modalities) == 1:
    (labels, outs), = embeddings.values()
    for key, value in outs.items():
      for label, row in zip(labels, value):
        flat = np.asarray(row).reshape(-1)
        head = ", ".join(f"{x:.4f}" for x in flat[:6])
        print(f"{modalities[0]} {label!r} {key} {list(np.shape(row))}: [{head}{', ...' if flat.size > 6 else ''}]")
    return 0
  for i, a in enumerate(modalities):
    for b in modalities[i + 1:]:
      try:
        space = args.space or client_lib.shared_space(outputs, a, b)
      except ValueError as e:
        print(f"mmv-tf query: {e}", file=sys.stderr)
        return 2
      la, oa = embeddings[a]
      lb, ob = embeddings[b]
      sims = client_lib.similarity_matrix(oa[space], ob[space])
      print(client_lib.similarity_table(la, lb, sims, title=f"{a} x {b} cosine similarity ({space} space)"))
      print()
  return 0


COMMANDS = {
    "export": (_export_args, _export_run),
    "serve": (_serve_args, _serve_run),
    "query": (_query_args, _query_run),
}
