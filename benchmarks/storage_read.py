"""Shard read throughput from an object store vs local disk, through the project's own reader.

The same synthetic webdataset shards (benchmarks/synthetic.py: 4:3 JPEGs, alt-text and a 49-word
recaption per sample) are read front to back by `t2i_recap.shards.iter_tar_samples` from:

  local   the files under --out (after a first pass, from the OS page cache)
  s3      an S3-compatible server on 127.0.0.1 (moto's ThreadedMotoServer), through s3fs
  http    Python's http.server on 127.0.0.1, through fsspec's HTTPFileSystem

Both servers run in this process on loopback, so the s3 and http rows measure the client path
(request overhead, fsspec buffering, the server's own Python cost), not a network: a real store adds
its latency and bandwidth limit. Each row is the median of --repeats full passes.

  python benchmarks/storage_read.py --out /tmp/storage_bench
  python benchmarks/storage_read.py --out /tmp/storage_bench --samples 64 --shards 2 --image-size 128  # smoke
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic  # noqa: E402
from common import add_output_args, pick_device, report  # noqa: E402

BUCKET = "storage-bench"


def read_all(urls: list) -> tuple[int, int]:
    """(samples, bytes of their members) of every shard, read through t2i_recap.shards."""
    from t2i_recap.shards import iter_tar_samples

    samples = size = 0
    for url in urls:
        for raw in iter_tar_samples(url):
            if raw.error:
                raise RuntimeError(f"{url}: {raw.key}: {raw.error}")
            samples += 1
            size += sum(len(v) for v in raw.files.values())
    return samples, size


def start_s3(paths: list[Path]) -> tuple[object, list[str]]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    from t2i_recap import storage

    fs, _ = storage.filesystem(f"s3://{BUCKET}/x")
    fs.mkdir(BUCKET)
    for p in paths:
        fs.put_file(str(p), f"{BUCKET}/shards/{p.name}")
    return server, [f"s3://{BUCKET}/shards/{p.name}" for p in paths]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def start_http(folder: Path, paths: list[Path]) -> tuple[http.server.ThreadingHTTPServer, list[str]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, [f"http://127.0.0.1:{server.server_address[1]}/{p.name}" for p in paths]


def measure(name: str, urls: list, repeats: int) -> dict:
    read_all(urls)  # warm-up: connections, page cache, imports
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        samples, size = read_all(urls)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"source": name, "shards": len(urls), "samples": samples, "MB": size / 1e6, "seconds": sec,
            "samples_per_s": samples / sec, "MB_per_s": size / 1e6 / sec}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the synthetic shards (reused when present)")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--image-size", type=int, default=512, help="long side of the JPEGs")
    p.add_argument("--repeats", type=int, default=3)
    add_output_args(p)
    args = p.parse_args(argv)
    device = pick_device("cpu")
    folder = Path(args.out) / f"shards-{args.samples}-{args.shards}-{args.image_size}"
    paths = synthetic.write_shards(folder, samples=args.samples, shards=args.shards, image_size=args.image_size)
    rows = [measure("local disk", paths, args.repeats)]
    s3_server, s3_urls = start_s3(paths)
    http_server, http_urls = start_http(folder, paths)
    try:
        rows.append(measure("s3 (moto on 127.0.0.1, s3fs)", s3_urls, args.repeats))
        rows.append(measure("http (http.server on 127.0.0.1)", http_urls, args.repeats))
    finally:
        http_server.shutdown()
        s3_server.stop()
    report("Shard read throughput: object store vs local disk", rows,
           ["source", "shards", "samples", "MB", "seconds", "samples_per_s", "MB_per_s"], args, device,
           digits={"MB": 1, "seconds": 3, "samples_per_s": 0, "MB_per_s": 1},
           notes=["t2i_recap.shards.iter_tar_samples over every shard; median of the timed passes after one warm-up",
                  "servers on loopback in the same process: client and server cost, no network"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
