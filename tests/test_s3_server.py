"""The S3 server the object-store tests run against behaves as S3 does where they rely on it."""

import pytest
from botocore.exceptions import ClientError
from conftest import S3Server


def test_a_wrong_secret_or_an_unknown_key_is_refused(s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="a", Body=b"1")
    for wrong in (
        S3Server(s3_server.endpoint, s3_server.access_key_id, "not-the-secret"),
        S3Server(s3_server.endpoint, "AKIAUNKNOWN000000000", s3_server.secret_access_key),
    ):
        with pytest.raises(ClientError) as refused:
            wrong.client().get_object(Bucket=s3_bucket, Key="a")
        assert refused.value.response["Error"]["Code"] in (
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
        )


def test_a_put_if_none_match_fails_when_the_object_exists(
    s3_server: S3Server, s3_bucket: str
) -> None:
    # deltalake commits version N by writing _delta_log/N.json with If-None-Match: *.
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="_delta_log/1.json", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as refused:
        client.put_object(
            Bucket=s3_bucket, Key="_delta_log/1.json", Body=b"second", IfNoneMatch="*"
        )
    assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
    body = client.get_object(Bucket=s3_bucket, Key="_delta_log/1.json")["Body"].read()
    assert body == b"first"
