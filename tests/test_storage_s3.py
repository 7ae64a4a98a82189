"""Object storage end to end: an S3-compatible server (moto's, on 127.0.0.1) and Python's http.server.

`caption run` from s3:// shards to s3:// sidecars (resume, every key once, identity by content),
a killed run leaves no partial sidecar object, `prepare` from s3:// builds the cache it builds from
local paths, and shards read over http://. One S3 server for the module; every test (and
tests/test_scale_e2e.py, whose server shares moto's in-process store) uses its own bucket prefix.
"""

from __future__ import annotations

import functools
import io
import http.server
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fixtures_captioner import CAPTIONER_SHARD_SIZE, CAPTIONER_SHARDS
from fixtures_train import train_config_dict, write_config

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

REPO = Path(__file__).resolve().parents[1]
BUCKET = "t2i-recap-test"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; AWS_ENDPOINT_URL points at it. Yields an s3fs client."""
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**AWS_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            mp.setenv(k, v)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(endpoint_url=f"http://{host}:{port}", skip_instance_cache=True, use_listings_cache=False)
        if not fs.exists(BUCKET):  # moto keeps its buckets in-process: another module's server made it already
            fs.mkdir(BUCKET)
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _upload(fs, folder: Path, prefix: str, pattern: str = "*") -> str:
    for f in sorted(folder.glob(pattern)):
        fs.put_file(str(f), f"{BUCKET}/{prefix}/{f.name}")
    return f"s3://{BUCKET}/{prefix}"


def _objects(fs, prefix: str) -> dict[str, dict]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1]: fs.info(p) for p in fs.find(f"{BUCKET}/{prefix}")}


def _tar_keys(folder: Path) -> list[str]:
    keys = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys += sorted({m.name.split(".")[0] for m in t.getmembers()})
    return keys


def _sidecar_keys(fs, prefix: str) -> list[str]:
    keys = []
    for path in sorted(p for p in fs.find(f"{BUCKET}/{prefix}") if p.endswith(".parquet")):
        with fs.open(path, "rb") as fh:
            keys += pq.read_table(fh, columns=["key"]).column("key").to_pylist()
    return keys


def _caption_args(src: str, out: str, model: Path, *extra: str) -> list[str]:
    return ["caption", "run", "--input", f"{src}/{{00000..00003}}.tar", "--out", out, "--model", str(model),
            "--batch-size", "4", "--max-new-tokens", "4", "--dtype", "float32", *extra]


# ---------------------------------------------------------------- captioning to and from the store


def test_caption_run_from_s3_to_s3_resumes_and_writes_every_key_once(s3, captioner_shards, tiny_llava_dir, capsys):
    from t2i_recap.captioner.writer import read_info
    from t2i_recap.cli import main
    from t2i_recap.identity import file_digest, same_content

    src = _upload(s3, captioner_shards, "cap/shards", "*.tar")
    out = f"s3://{BUCKET}/cap/sidecars"
    assert main(_caption_args(src, out, tiny_llava_dir)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards_done"] == CAPTIONER_SHARDS and not summary["shards_failed"]
    objects = _objects(s3, "cap/sidecars")
    assert sorted(objects) == [f"{i:05d}.parquet" for i in range(CAPTIONER_SHARDS)] + ["caption_config.yaml"]
    assert _sidecar_keys(s3, "cap/sidecars") == _tar_keys(captioner_shards)  # every sample, exactly once, in order

    info = read_info(f"{out}/00001.parquet")
    recorded = info["shard"]["input"]
    local = captioner_shards / "00001.tar"
    assert info["shard"]["source"] == f"{src}/00001.tar"
    assert recorded["digest"] == "sha256:" + file_digest(local)  # the object's digest is the bytes' digest
    assert recorded["samples"] == CAPTIONER_SHARD_SIZE and recorded["etag"]
    assert same_content(local, recorded)  # the local copy of the same bytes is the same shard

    assert main(_caption_args(src, out, tiny_llava_dir)) == 0  # rerun: every shard is finished
    again = json.loads(capsys.readouterr().out)
    assert again["shards_skipped_done"] == CAPTIONER_SHARDS and again["shards_done"] == 0
    after = _objects(s3, "cap/sidecars")
    for name, meta in objects.items():
        if name.endswith(".parquet"):  # not rewritten: same ETag and last-modified time
            assert (after[name]["ETag"], after[name]["LastModified"]) == (meta["ETag"], meta["LastModified"])

    s3.pipe_file(f"{BUCKET}/cap/shards/00002.tar", local.read_bytes())  # a shard replaced by other bytes
    assert main(_caption_args(src, out, tiny_llava_dir)) == 0
    third = json.loads(capsys.readouterr().out)
    assert third["shards_done"] == 1 and third["shards_skipped_done"] == CAPTIONER_SHARDS - 1


def test_killed_run_leaves_no_partial_sidecar_object_and_rerun_completes(s3, captioner_shards, tiny_llava_dir,
                                                                        one_thread):
    """SIGKILL once the first sidecar object exists: each visible object is a whole sidecar; a rerun
    finishes the rest without rewriting those."""
    src = _upload(s3, captioner_shards, "kill/shards", "*.tar")
    out = f"s3://{BUCKET}/kill/sidecars"
    cmd = [sys.executable, "-m", "t2i_recap.cli", *_caption_args(src, out, tiny_llava_dir)]
    cmd[cmd.index("--batch-size") + 1], cmd[cmd.index("--max-new-tokens") + 1] = "1", "24"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if any(n.endswith(".parquet") for n in _objects(s3, "kill/sidecars")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    seen = _objects(s3, "kill/sidecars")
    done = {n: m for n, m in seen.items() if n.endswith(".parquet")}
    assert 1 <= len(done) < CAPTIONER_SHARDS, "the run finished before it could be killed"
    assert set(seen) - set(done) <= {"caption_config.yaml"}  # no temp or partial objects
    for name in done:  # each visible sidecar is complete: every sample of its shard
        with s3.open(f"{BUCKET}/kill/sidecars/{name}", "rb") as fh:
            assert pq.read_table(fh).num_rows == CAPTIONER_SHARD_SIZE
    assert not s3.list_multipart_uploads(BUCKET)  # no upload left open either

    from t2i_recap.cli import main

    assert main(cmd[3:]) == 0  # the same command, rerun
    assert _sidecar_keys(s3, "kill/sidecars") == _tar_keys(captioner_shards)
    after = _objects(s3, "kill/sidecars")
    assert all(after[n]["ETag"] == m["ETag"] and after[n]["LastModified"] == m["LastModified"] for n, m in done.items())


def test_a_failed_sidecar_write_sends_nothing(s3, monkeypatch):
    """The parquet bytes fail half-way (a bad row, a full memory): no object appears under the key."""
    import pyarrow.parquet as pq_mod

    from t2i_recap.captioner.writer import Row, write_sidecar

    def half_then_fail(table, where, **kw):
        where.write(b"PAR1 half a file")
        raise OSError("serialisation failed")

    monkeypatch.setattr(pq_mod, "write_table", half_then_fail)
    url = f"s3://{BUCKET}/failed/00000.parquet"
    with pytest.raises(OSError, match="serialisation failed"):
        write_sidecar(url, [Row(key="a", re_caption="x")], {"fingerprint": {}})
    assert not s3.exists(f"{BUCKET}/failed/00000.parquet")


def test_remote_output_claims(tmp_path, s3, captioner_shards):
    """Claims stay on POSIX: under claims_dir when given; several processes without it are refused."""
    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run
    from t2i_recap.storage import claims_root

    out = f"s3://{BUCKET}/claims/sidecars"
    root = claims_root(out, str(tmp_path / "claims"), world=4)
    assert root.parent == tmp_path / "claims" and root.is_dir()
    assert claims_root(out, str(tmp_path / "claims"), world=4) == root  # the same output: the same folder
    assert claims_root(out + "-other", str(tmp_path / "claims"), world=4) != root
    assert claims_root(tmp_path / "local", None, world=4) == tmp_path / "local"
    with pytest.raises(ValueError, match="not a URL"):
        claims_root(out, "s3://bucket/claims", world=2)

    src = _upload(s3, captioner_shards, "claims/shards", "*.tar")
    cfg = CaptionRunConfig(input=src, out=out, model="unused", batch_size=4)
    with pytest.raises(ValueError, match="claims_dir"):  # rank 0 of 2, no shared claims folder
        caption_run(cfg, Dist(0, 2), _EchoBackend())
    cfg.claims_dir = str(tmp_path / "claims")
    summary = caption_run(cfg, Dist(0, 2), _EchoBackend())
    assert summary["shards_done"] == CAPTIONER_SHARDS // 2
    assert sorted(n for n in _objects(s3, "claims/sidecars") if n.endswith(".parquet")) == ["00000.parquet",
                                                                                           "00002.parquet"]
    assert root.is_dir() and not list(root.rglob("*.claim"))  # claimed there, released and pruned


# ---------------------------------------------------------------- identity, listing, errors


def test_object_identity_by_content(s3, captioner_shards, monkeypatch):
    from t2i_recap import storage
    from t2i_recap.identity import describe, file_digest, same_content, shard_digest
    from t2i_recap.shards import shard_id

    local = captioner_shards / "00000.tar"
    url = _upload(s3, captioner_shards, "ident", "00000.tar") + "/00000.tar"
    assert shard_id(url) == "00000" and shard_id(f"s3://{BUCKET}/x/web.00007.tar.gz") == "web.00007"
    rec = describe(url)
    assert rec["digest"] == shard_digest(local) and rec["size"] == local.stat().st_size and rec["etag"]

    def no_read(location):
        raise AssertionError(f"{location} was read in full")

    monkeypatch.setattr(storage, "sha256", no_read)
    assert same_content(url, rec)  # size + ETag: trusted without reading
    monkeypatch.undo()
    s3.copy(f"{BUCKET}/ident/00000.tar", f"{BUCKET}/ident/copy.tar")
    assert same_content(f"s3://{BUCKET}/ident/copy.tar", rec)  # a copy elsewhere is the same shard
    other = bytearray(local.read_bytes())
    other[-2000] ^= 1
    s3.pipe_file(f"{BUCKET}/ident/00000.tar", bytes(other))  # same size, other bytes
    assert not same_content(url, rec)
    assert file_digest(url) != rec["digest"].split(":", 1)[1]


def test_listing_and_errors(s3, captioner_shards, monkeypatch):
    from t2i_recap import extras, storage
    from t2i_recap.io import expand_shards

    src = _upload(s3, captioner_shards, "list", "*.tar")
    want = [f"{src}/{i:05d}.tar" for i in range(CAPTIONER_SHARDS)]
    assert expand_shards(f"{src}/{{00000..00003}}.tar") == want
    assert expand_shards(f"{src}/*.tar") == want
    assert expand_shards(src) == want  # a prefix: its objects with shard suffixes
    with pytest.raises(FileNotFoundError, match="00004.tar does not exist"):
        expand_shards(f"{src}/{{00000..00009}}.tar")
    with pytest.raises(ValueError, match="read-only"):
        storage.write_bytes("https://example.invalid/x", b"")
    with pytest.raises(ValueError, match="cache_dir"):
        from t2i_recap.cache import FeaturesConfig

        FeaturesConfig(cache_dir=f"s3://{BUCKET}/cache")
    real = extras.available
    monkeypatch.setattr(extras, "available", lambda m: m != "s3fs" and real(m))
    with pytest.raises(extras.MissingExtraError, match=r"t2i-recap\[s3\]"):
        storage.exists(f"{src}/00000.tar")


def test_parquet_shards_from_s3(s3, tmp_path):
    """A parquet input (image bytes + caption) is read from the store by row group, every row a sample."""
    import io

    import pyarrow as pa
    from PIL import Image

    from t2i_recap.captioner.readers import ReaderConfig, open_shards

    png = io.BytesIO()
    Image.new("RGB", (12, 10), (10, 200, 30)).save(png, format="PNG")
    rows = [{"key": f"k{i:03d}", "image": png.getvalue(), "caption": f"caption {i}"} for i in range(7)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet", row_group_size=3)
    src = _upload(s3, tmp_path, "pq", "*.parquet")
    shards = open_shards(src + "/", ReaderConfig())
    assert [s.name for s in shards] == ["part-0"]
    samples = list(shards[0].samples())
    assert [(s.key, s.org_caption, s.error) for s in samples] == [(r["key"], r["caption"], None) for r in rows]
    assert samples[0].image.size == (12, 10)


# ---------------------------------------------------------------- the trainer reads the store


def test_prepare_from_s3_builds_the_cache_it_builds_from_local(s3, tmp_path, train_assets, train_shards):
    from safetensors import safe_open

    from t2i_recap import prepare

    shards, side = train_shards
    remote_shards = _upload(s3, shards, "train/shards", "*.tar")
    remote_side = _upload(s3, side, "train/sidecars", "*.parquet")
    caches = {}
    for where, (sh, sc) in {"local": (shards, side), "s3": (remote_shards, remote_side)}.items():
        cfg = train_config_dict(train_assets, sh, tmp_path / f"run-{where}", sc,
                                features={"cache_dir": str(tmp_path / f"cache-{where}")})
        cfg["data"]["shards"] = f"{sh}/{{00000..00001}}.tar"
        assert prepare.main(["--config", str(write_config(tmp_path / f"{where}.yaml", cfg))]) == 0
        caches[where] = tmp_path / f"cache-{where}"
    names = sorted(p.name for p in caches["local"].glob("*.safetensors"))
    assert names == sorted(p.name for p in caches["s3"].glob("*.safetensors")) and "00000.safetensors" in names
    for name in names:
        with safe_open(str(caches["local"] / name), "pt") as a, safe_open(str(caches["s3"] / name), "pt") as b:
            ma, mb = a.metadata(), b.metadata()
            for k in ("fingerprint", "keys", "stats", "content"):  # content: the same digests, wherever they lie
                assert ma.get(k) == mb.get(k), (name, k)
            assert sorted(a.keys()) == sorted(b.keys())
            for k in a.keys():
                assert a.get_tensor(k).equal(b.get_tensor(k)), (name, k)


def test_train_on_the_fly_from_s3_equals_local(s3, tmp_path, train_assets, train_shards, one_thread):
    from safetensors.torch import load_file

    from t2i_recap.config import from_dict
    from t2i_recap.train_config import TrainConfig
    from t2i_recap.trainer import train

    shards, side = train_shards
    remote = {"shards": _upload(s3, shards, "fly/shards", "*.tar"), "side": _upload(s3, side, "fly/side", "*.parquet")}
    models = {}
    for where, (sh, sc) in {"local": (shards, side), "s3": (remote["shards"], remote["side"])}.items():
        cfg = train_config_dict(train_assets, sh, tmp_path / where, sc, mixing={"p": 0.5},
                                trainer={"max_steps": 2}, checkpoint={"every_steps": 2})
        train(from_dict(TrainConfig, cfg))
        models[where] = load_file(str(tmp_path / where / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert models["local"].keys() == models["s3"].keys()
    assert all(models["local"][k].equal(models["s3"][k]) for k in models["local"])


# ---------------------------------------------------------------- http


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_http_shards_are_read_and_captioned(http_root, captioner_shards, tmp_path):
    import shutil

    from t2i_recap.captioner.run import CaptionRunConfig, Dist, caption_run
    from t2i_recap.captioner.writer import read_info
    from t2i_recap.identity import shard_digest
    from t2i_recap.io import expand_shards
    from t2i_recap.shards import iter_tar_samples

    root, base = http_root
    for f in captioner_shards.glob("*.tar"):
        shutil.copy(f, root / f.name)
    urls = expand_shards(f"{base}/{{00000..00003}}.tar")
    assert urls == [f"{base}/{i:05d}.tar" for i in range(CAPTIONER_SHARDS)]
    remote = [(s.key, s.files) for s in iter_tar_samples(urls[1])]
    assert remote == [(s.key, s.files) for s in iter_tar_samples(captioner_shards / "00001.tar")]

    big = os.urandom(9 << 20)  # past one 8 MiB read block, from a host without range requests
    with tarfile.open(root / "big.tar", "w") as tar:
        member = tarfile.TarInfo("k0.bin")
        member.size = len(big)
        tar.addfile(member, io.BytesIO(big))
    assert [(s.key, s.files) for s in iter_tar_samples(f"{base}/big.tar")] == [("k0", {"bin": big})]

    out = tmp_path / "out"
    cfg = CaptionRunConfig(input=f"{base}/{{00000..00003}}.tar", out=str(out), model="unused", batch_size=4)
    summary = caption_run(cfg, Dist(), _EchoBackend())
    assert summary["shards_done"] == CAPTIONER_SHARDS
    info = read_info(out / "00003.parquet")
    assert info["shard"]["input"]["digest"] == shard_digest(captioner_shards / "00003.tar")
    assert caption_run(cfg, Dist(), _EchoBackend())["shards_skipped_done"] == CAPTIONER_SHARDS


class _EchoBackend:
    def caption(self, images, prompts, max_new_tokens=128):
        from t2i_recap.captioner.backend import Generation

        return [Generation(f"an image of {im.width} px", "stop", 5) for im in images]

    def describe(self):
        return {"backend": "echo"}


def test_eval_reference_shards_from_s3(s3, captioner_shards):
    """`eval run --reference s3://.../{...}.tar`: the reference images stream from the store."""
    from t2i_recap.evaluate.metric_fid import load_reference

    src = _upload(s3, captioner_shards, "ref", "*.tar")
    remote = load_reference(f"{src}/{{00000..00001}}.tar")
    local = load_reference(f"{captioner_shards}/{{00000..00001}}.tar")
    assert len(remote) == 2 * CAPTIONER_SHARD_SIZE
    assert [im.tobytes() for im in remote] == [im.tobytes() for im in local]


def test_store_metadata_is_read_as_identity(monkeypatch):
    """Last-Modified headers, weak ETags and the hub's LFS sha256 (no hub here: its info() shape, faked)."""
    from t2i_recap import storage
    from t2i_recap.identity import file_digest

    assert storage._mtime_ns({"Last-Modified": "Wed, 02 Dec 2026 17:00:00 GMT"}) == 1796230800 * 10**9
    assert storage._etag({"ETag": 'W/"abc"'}) is None and storage._etag({"ETag": '"abc"'}) == "abc"

    class HubLike:
        def invalidate_cache(self, path=None):
            pass

        def info(self, path):
            return {"name": path, "size": 3, "type": "file", "blob_id": "b10b", "lfs": {"size": 3, "sha256": "ab" * 32}}

    monkeypatch.setattr(storage, "filesystem", lambda url: (HubLike(), url.split("://", 1)[1]))
    url = "hf://datasets/org/name/data/00000.tar"
    assert storage.info(url) == {"size": 3, "mtime_ns": None, "etag": "b10b", "sha256": "ab" * 32}
    assert file_digest(url) == "ab" * 32  # taken from the store, never read


def test_a_run_folder_url_is_refused():
    from t2i_recap.config import ConfigError, from_dict
    from t2i_recap.trainer import TrainerConfig

    with pytest.raises(ConfigError, match="run_dir='s3://bucket/run'"):
        from_dict(TrainerConfig, {"run_dir": "s3://bucket/run"})
