"""Readiness check for an S3-compatible test server, run by scripts/up and status.

Usage: s3_check.py ENDPOINT ACCESS_KEY SECRET_KEY BUCKET [--list-only]

Signs with SigV4 (boto3), path-style, region us-east-1. Creates BUCKET unless it
exists, then lists the buckets and fails unless BUCKET is among them. With
--list-only it only lists. Exit code 0 when the server really answers.
"""

import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


def main() -> int:
    endpoint, access_key, secret_key, bucket = sys.argv[1:5]
    list_only = "--list-only" in sys.argv[5:]
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            connect_timeout=3,
            read_timeout=10,
            retries={"max_attempts": 1},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    if not list_only:
        try:
            s3.create_bucket(Bucket=bucket)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
    names = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
    if not list_only and bucket not in names:
        print(f"bucket {bucket} was created but is not listed: {names}", file=sys.stderr)
        return 1
    print(f"{endpoint}: {len(names)} bucket(s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as err:  # one line for the caller's retry loop and error message
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
