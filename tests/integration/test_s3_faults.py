"""S3 that misbehaves: `sempart label` and `sempart train` through a fault-injecting proxy
in front of moto (503 SlowDown, 500, reset connections, 2 s delays), the retry settings
reaching every client, and `--s3-anon` sending no credentials at all.

Each test points AWS_ENDPOINT_URL at the proxy (the label and train commands forward it
to their Ray workers), and reads the results back from moto directly.
"""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image
from cli_args import ONE_ACTOR
from s3_fault_proxy import NO_FAULTS, FaultProxy, Faults
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.schema import image_id_for
from pipeline.storage import pyarrow_s3, s3_client
from sempart_core import s3settings, uri
from sempart_core.postprocess import rle_to_mask

pytestmark = pytest.mark.integration
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "train_sample"
ALWAYS_SLOW_DOWN = Faults(slow_down=1.0, internal_error=0.0, reset=0.0, delay=0.0)


def png(seed: int, h: int = 40, w: int = 56) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = (rng.random((h, w, 3)) * 80).astype(np.uint8)
    rgb[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = rng.integers(150, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def upload_folder(client, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder)}", Body=path.read_bytes())


def read_parts(client, bucket: str, prefix: str) -> pa.Table:
    """The labels table under s3://bucket/prefix, read with boto3 (not through the proxy)."""
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/part-")["Contents"])
    return pa.concat_tables(pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=k)["Body"].read()))
                            for k in keys)


def assert_complete(rows: list[dict], uris: list[str]) -> None:
    """Every input exactly once; every ok mask decodes to the image's size."""
    assert sorted(r["uri"] for r in rows) == sorted(uris)
    assert len({r["image_id"] for r in rows}) == len(uris)
    for r in rows:
        assert r["image_id"] == image_id_for(r["uri"])
        if r["status"] == "ok":
            assert rle_to_mask(r["mask_rle"]).shape == (r["height"], r["width"])


@pytest.fixture
def client(s3_endpoint: str):
    return boto3.client("s3", endpoint_url=s3_endpoint)


def test_settings_reach_every_client_and_survive_pickling(s3_endpoint: str, s3_bucket: str, client,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """SEMPART_S3_MAX_ATTEMPTS bounds the attempts of pyarrow (also once pickled, as Ray
    sends it to workers), boto3 and s3fs; the retries of boto3 and s3fs are counted."""
    bucket = s3_bucket.removeprefix("s3://")
    client.put_object(Bucket=bucket, Key="k", Body=b"data")
    monkeypatch.setenv("SEMPART_S3_MAX_ATTEMPTS", "2")  # pyarrow's own default is 3
    with FaultProxy(s3_endpoint, ALWAYS_SLOW_DOWN, seed=0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        fs = pickle.loads(pickle.dumps(pyarrow_s3()))
        with pytest.raises(OSError, match="503"):
            fs.open_input_stream(f"{bucket}/k")
        assert proxy.counts["requests"] == 2
        before = s3settings.retries()
        with pytest.raises(Exception, match="SlowDown"):
            s3_client().get_object(Bucket=bucket, Key="k")
        assert proxy.counts["requests"] == proxy.counts["signed"] == 4  # keys in the environment: signed
        assert s3settings.retries() - before == 1
        before = s3settings.retries()
        with pytest.raises(OSError):
            uri.read_bytes(f"{s3_bucket}/k")  # s3fs
        assert proxy.counts["requests"] == 6
        assert s3settings.retries() - before == 1


SUSTAINED_THROTTLING = Faults(slow_down=0.30, internal_error=0.05, reset=0.03, delay=0.0)
CALLS = 200  # of each kind per client: their retries would drain a retry quota many times over


def test_every_client_rides_out_sustained_throttling(s3_endpoint: str, s3_bucket: str, client,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One long-lived client each (pyarrow, boto3, s3fs), as in a long run, through an S3
    that throttles 30 % of requests, fails 5 % with 500 (HEAD answers without a body)
    and resets 3 %: HEAD, GET (a 60-byte object too, shorter than an error answer),
    LIST and PUT, CALLS of each, none fails. The AWS "standard" retry mode would stop
    retrying once its per-client quota ran dry; the botocore clients count their retries."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.storage import read_object

    bucket = s3_bucket.removeprefix("s3://")
    bodies = {f"in/{i}": png(i) for i in range(20)} | {"in/tiny": b"t" * 60}
    for key, body in bodies.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    keys = sorted(bodies)
    # Waits of at most 2 s (20 by default): the quota is drained as fast, and the test
    # is not decided by the few calls that meet five faults in a row.
    monkeypatch.setenv("SEMPART_S3_MAX_BACKOFF_S", "2")
    with FaultProxy(s3_endpoint, SUSTAINED_THROTTLING, seed=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        fs, boto, fsspec_fs = pyarrow_s3(), s3_client(), uri.filesystem(s3_bucket)[0]

        def via_pyarrow(i: int) -> None:
            key = keys[i % len(keys)]
            assert fs.get_file_info(f"{bucket}/{key}").size == len(bodies[key])
            assert read_object(f"{s3_bucket}/{key}") == bodies[key]
            if i % 10 == 0:
                assert len(fs.get_file_info(pafs.FileSelector(f"{bucket}/in"))) == len(keys)
                with fs.open_output_stream(f"{bucket}/out/pa-{i}") as f:
                    f.write(b"written")

        def via_boto3(i: int) -> None:
            key = keys[i % len(keys)]
            assert boto.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(bodies[key])
            assert boto.get_object(Bucket=bucket, Key=key)["Body"].read() == bodies[key]
            if i % 10 == 0:
                assert boto.list_objects_v2(Bucket=bucket, Prefix="in/")["KeyCount"] == len(keys)
                boto.put_object(Bucket=bucket, Key=f"out/boto-{i}", Body=b"written")

        def via_s3fs(i: int) -> None:
            key = keys[i % len(keys)]
            assert fsspec_fs.info(f"{bucket}/{key}")["size"] == len(bodies[key])
            assert fsspec_fs.cat_file(f"{bucket}/{key}") == bodies[key]
            if i % 10 == 0:
                assert len(fsspec_fs.ls(f"{bucket}/in", refresh=True)) == len(keys)
                fsspec_fs.pipe_file(f"{bucket}/out/s3fs-{i}", b"written")

        retries_before = s3settings.retries()
        with ThreadPoolExecutor(32) as pool:
            for calls in (via_pyarrow, via_boto3, via_s3fs):
                list(pool.map(calls, range(CALLS)))  # re-raises the first failed call
    assert min(proxy.counts[f] for f in ("slow_down", "internal_error", "reset")) > 30, proxy.counts
    assert s3settings.retries() - retries_before > 100  # boto3's and s3fs's
    assert len(client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]) == 3 * CALLS // 10


@pytest.mark.parametrize("decode", [("--decode", "cpu"), ("--decode", "gpu", "--finish", "device")], ids=["cpu", "gpu"])
def test_label_s3_to_s3_through_faults(s3_endpoint: str, s3_bucket: str, client, ray_session, model: str,
                                       monkeypatch: pytest.MonkeyPatch, decode: tuple[str, ...]) -> None:
    """Model, images and table on S3, every request through the fault proxy: the run
    ends as it would without faults (exit 1: the one undecodable image is an error row,
    and no fault adds another), with every image exactly once. Images read by decode
    tasks, or (--decode gpu) by the inference actor, several at a time."""
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    bucket = s3_bucket.removeprefix("s3://")
    upload_folder(client, bucket, Path(model), "model")
    uris = []
    for i in range(24):
        client.put_object(Bucket=bucket, Key=f"in/{i:02d}.png", Body=png(i))
        uris.append(f"{s3_bucket}/in/{i:02d}.png")
    client.put_object(Bucket=bucket, Key="in/broken.png", Body=b"not a png")
    uris.append(f"{s3_bucket}/in/broken.png")

    with FaultProxy(s3_endpoint, Faults(), seed=13) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        result = CliRunner().invoke(app, ["label", "--model", f"{s3_bucket}/model", "--input", f"{s3_bucket}/in",
                                          "--out", f"{s3_bucket}/labels", "--rows-per-file", "5",
                                          "--batch-size", "4", "--no-gpu", *decode])
    assert result.exit_code == 1, result.output
    assert "error 1" in result.output
    # the proxy was in the way of this run, and faults were met (seed 13 draws each kind
    # of fault within its first 36 requests)
    assert proxy.counts["requests"] > 50
    assert min(proxy.counts[f] for f in ("slow_down", "internal_error", "reset", "delay")) > 0, proxy.counts

    rows = read_parts(client, bucket, "labels").to_pylist()
    assert_complete(rows, uris)
    errors = {r["uri"]: r["error"] for r in rows if r["status"] == "error"}
    assert list(errors) == [f"{s3_bucket}/in/broken.png"], errors
    runs = client.list_objects_v2(Bucket=bucket, Prefix="labels/_runs/")["Contents"]
    state = json.loads(client.get_object(Bucket=bucket, Key=runs[0]["Key"])["Body"].read())
    assert state["status"] == "finished" and sum(state["counts"].values()) == len(uris)


def test_a_file_that_cannot_be_written_ends_the_run_with_one_line_then_resume(
        s3_endpoint: str, s3_bucket: str, client, ray_session, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 answers 500 to every request for one part file, through every retry: the run
    labels the rest and exits 1 naming that file and why (the writer's error used to
    abort the whole run); --resume then writes it."""
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    bucket = s3_bucket.removeprefix("s3://")
    uris = []
    for i in range(9):
        client.put_object(Bucket=bucket, Key=f"in/{i}.png", Body=png(200 + i))
        uris.append(f"{s3_bucket}/in/{i}.png")
    command = ["label", "--model", model, "--input", f"{s3_bucket}/in", "--out", f"{s3_bucket}/labels",
               "--rows-per-file", "3", "--no-gpu", *ONE_ACTOR]
    monkeypatch.setenv("SEMPART_S3_MAX_ATTEMPTS", "2")
    with FaultProxy(s3_endpoint, Faults(internal_error=1.0, slow_down=0, reset=0, delay=0, only="-000001.parquet"),
                    seed=0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        result = CliRunner().invoke(app, command)
    assert result.exit_code == 1, result.output
    assert proxy.counts["internal_error"] >= 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 3 files were not written (chunks 1): run again with --resume "
                           "(chunk 1 not written: OSError: "), last
    assert len(client.list_objects_v2(Bucket=bucket, Prefix="labels/part-")["Contents"]) == 2
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    result = CliRunner().invoke(app, [*command, "--resume"])
    assert result.exit_code == 0, result.output
    assert_complete(read_parts(client, bucket, "labels").to_pylist(), uris)


def test_train_with_s3_checkpoints_through_faults(s3_endpoint: str, s3_bucket: str, client, ray_session,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Images, checkpoints and the model on S3 through the fault proxy: training ends
    (exit 0) with its checkpoints and a readable model."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # see test_train.py
    monkeypatch.setenv("SEMPART_S3_MAX_BACKOFF_S", "2")  # retried as often, waits shorter
    bucket = s3_bucket.removeprefix("s3://")
    upload_folder(client, bucket, SAMPLE, "images")

    # Delays of 0.5 s (2 s by default): a stalled request is a stalled request, and the
    # checkpoint uploads meet them one after another.
    with FaultProxy(s3_endpoint, Faults(delay_s=0.5), seed=7) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        result = CliRunner().invoke(app, [
            "train", "--data", f"{s3_bucket}/images", "--out", f"{s3_bucket}/runs", "--name", "faulty",
            "--backbone", "vit_tiny_patch16_224", "--weights", "random", "--image-size", "32",
            "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2", "--workers", "1", "--no-gpu",
        ])
    assert result.exit_code == 0, result.output
    assert "step 4" in result.output
    assert proxy.counts["requests"] > 20
    assert proxy.counts["slow_down"] > 0, proxy.counts

    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/faulty/")["Contents"]]
    assert any(k.startswith("runs/faulty/checkpoint_00000004/") for k in keys)
    meta = json.loads(client.get_object(Bucket=bucket, Key="runs/faulty/model/sempart.json")["Body"].read())
    assert meta["steps"] == 4


def test_s3_anon_reads_a_public_bucket(s3_endpoint: str, s3_bucket: str, client, ray_session, model: str,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--s3-anon`: the model and the images come from a bucket that allows anonymous
    reads, and no request of the run (listing, model, images, in every process) is signed.

    moto answers 403 to anonymous object reads unless the bucket policy allows them, but
    does not check signatures: the proxy is what tells a signed request from an
    anonymous one."""
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    bucket = s3_bucket.removeprefix("s3://")
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket",
                                                                  "s3:HeadObject"],  # moto's name for HEAD
                       "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}],
    }))
    upload_folder(client, bucket, Path(model), "model")
    uris = []
    for i in range(6):
        client.put_object(Bucket=bucket, Key=f"public/{i}.png", Body=png(100 + i))
        uris.append(f"{s3_bucket}/public/{i}.png")

    monkeypatch.setenv("SEMPART_S3_ANON", "0")  # restored afterwards: --s3-anon sets it for the process
    with FaultProxy(s3_endpoint, NO_FAULTS) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        out = tmp_path / "labels"
        result = CliRunner().invoke(app, ["label", "--model", f"{s3_bucket}/model", "--input", f"{s3_bucket}/public",
                                          "--out", str(out), "--s3-anon", "--rows-per-file", "3", "--no-gpu", *ONE_ACTOR])
    assert result.exit_code == 0, result.output
    assert proxy.counts["requests"] > 6  # listing, model files, one or more per image
    assert proxy.counts["signed"] == 0, proxy.counts
    assert_complete(pq.read_table(out).to_pylist(), uris)
