"""URI helpers and backbone weights through a real S3 API (moto server) and local disk."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import boto3
import pytest
import safetensors.torch
import torch

from sempart_core import uri
from sempart_core.backbone import Backbone, WeightLoadError, create_vit, load_backbone_weights

pytestmark = pytest.mark.integration


def s3_object(endpoint: str, object_uri: str) -> bytes:
    """Read with boto3, independently of sempart_core.uri."""
    bucket, key = object_uri.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3", endpoint_url=endpoint)
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture(params=["s3", "local", "file"])
def root(request, tmp_path: Path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/some/prefix"
    if request.param == "file":
        return f"file://{tmp_path}/out"
    return str(tmp_path / "out")


def test_write_read_exists(root: str) -> None:
    target = uri.join(root, "nested/dir", "blob.bin")
    assert not uri.exists(target)
    uri.write_bytes(target, b"first")
    uri.write_bytes(target, b"second version")
    assert uri.exists(target)
    assert uri.read_bytes(target) == b"second version"
    assert not uri.exists(uri.join(root, "nested/dir", "other.bin"))
    with pytest.raises(FileNotFoundError, match="other.bin"):
        uri.read_bytes(uri.join(root, "other.bin"))


def test_objects_land_where_other_clients_look(s3_endpoint: str, s3_bucket: str,
                                               tmp_path: Path) -> None:
    remote = uri.join(s3_bucket, "a", "b.bin")
    uri.write_bytes(remote, b"\x00\x01payload")
    assert s3_object(s3_endpoint, remote) == b"\x00\x01payload"

    local = tmp_path / "deep" / "er" / "c.bin"
    uri.write_bytes(str(local), b"xyz")
    assert local.read_bytes() == b"xyz"
    assert sorted(p.name for p in local.parent.iterdir()) == ["c.bin"]  # no temp files


def serialise(state: dict[str, torch.Tensor], suffix: str) -> bytes:
    if suffix == ".safetensors":
        return safetensors.torch.save({k: v.contiguous() for k, v in state.items()})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_vit("vit_small_patch8_224", embed_dim=48, depth=2, num_heads=2)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_weights_round_trip_through_s3(suffix: str, s3_endpoint: str,
                                                s3_bucket: str) -> None:
    source, target = tiny(1), tiny(2)
    data = serialise(source.state_dict(), suffix)
    bucket = s3_bucket.removeprefix("s3://")
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket=bucket, Key=f"weights/vit{suffix}", Body=data)

    sha256 = load_backbone_weights(target, f"{s3_bucket}/weights/vit{suffix}")

    assert sha256 == hashlib.sha256(data).hexdigest()
    x = torch.randn(1, 3, 32, 48)
    assert torch.equal(Backbone(target)(x), Backbone(source)(x))


def test_missing_weights_object_is_a_clear_error(s3_bucket: str) -> None:
    with pytest.raises(WeightLoadError, match=f"cannot read backbone weights {s3_bucket}/nope.pth"):
        load_backbone_weights(tiny(0), f"{s3_bucket}/nope.pth")
