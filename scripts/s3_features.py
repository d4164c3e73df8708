"""What an S3-compatible test server supports, tried with boto3 (SigV4, path-style).

Usage: $KEEL_CACHE/venv/bin/python scripts/s3_features.py NAME=ENDPOINT=ACCESS=SECRET...
Prints one table row per check and server: "ok", "refused (403)", "accepted",
or the error code. A tool for choosing servers and writing scripts/README.md, not
a test: it asserts nothing.
"""

import sys
import time
import urllib.error
import urllib.request
import uuid

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

PART = 5 * 1024 * 1024


def client(endpoint, access, secret):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            retries={"max_attempts": 1},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def http(method, url, data=None):
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        # urllib's default form content type makes moto store an empty object.
        request.add_header("Content-Type", "application/octet-stream")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def status_word(code):
    return "accepted" if 200 <= code < 300 else f"refused ({code})"


def tamper(url):
    start = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    end = url.find("&", start)
    end = len(url) if end < 0 else end
    last = "1" if url[end - 1] == "0" else "0"
    return url[: end - 1] + last + url[end:]


def checks(s3, endpoint, access, secret):
    bucket = f"keel-features-{uuid.uuid4()}"
    s3.create_bucket(Bucket=bucket)

    def put_meta():
        s3.put_object(Bucket=bucket, Key="a.txt", Body=b"hello", ContentType="text/plain",
                      Metadata={"color": "blue"}, CacheControl="max-age=60")
        head = s3.head_object(Bucket=bucket, Key="a.txt")
        ok = (head["ContentType"] == "text/plain" and head["Metadata"].get("color") == "blue"
              and head.get("CacheControl") == "max-age=60")
        return "ok" if ok else f"stored differently: {head['ContentType']} {head['Metadata']} {head.get('CacheControl')}"

    def sse():
        s3.put_object(Bucket=bucket, Key="sse.txt", Body=b"x", ServerSideEncryption="AES256")
        head = s3.head_object(Bucket=bucket, Key="sse.txt")
        return "accepted, echoed" if head.get("ServerSideEncryption") == "AES256" else "accepted, not echoed"

    def acl():
        s3.put_object(Bucket=bucket, Key="acl.txt", Body=b"x", ACL="public-read")
        try:
            s3.get_object_acl(Bucket=bucket, Key="acl.txt")
            return "accepted; GetObjectAcl ok"
        except ClientError as err:
            return f"accepted; GetObjectAcl {err.response['Error']['Code']}"

    def multipart():
        up = s3.create_multipart_upload(Bucket=bucket, Key="big.bin")
        p1 = s3.upload_part(Bucket=bucket, Key="big.bin", UploadId=up["UploadId"], PartNumber=1, Body=b"a" * PART)
        p2 = s3.upload_part(Bucket=bucket, Key="big.bin", UploadId=up["UploadId"], PartNumber=2, Body=b"b" * 10)
        s3.complete_multipart_upload(Bucket=bucket, Key="big.bin", UploadId=up["UploadId"], MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": p1["ETag"]}, {"PartNumber": 2, "ETag": p2["ETag"]}]})
        size = s3.head_object(Bucket=bucket, Key="big.bin")["ContentLength"]
        return "ok" if size == PART + 10 else f"size {size}"

    def list_uploads():
        up = s3.create_multipart_upload(Bucket=bucket, Key="orphan.bin")
        listed = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        s3.abort_multipart_upload(Bucket=bucket, Key="orphan.bin", UploadId=up["UploadId"])
        return "ok" if any(u["UploadId"] == up["UploadId"] for u in listed) else "not listed"

    def abort():
        up = s3.create_multipart_upload(Bucket=bucket, Key="gone.bin")
        s3.abort_multipart_upload(Bucket=bucket, Key="gone.bin", UploadId=up["UploadId"])
        return "ok"

    def copy():
        s3.copy_object(Bucket=bucket, Key="copy.txt", CopySource={"Bucket": bucket, "Key": "a.txt"})
        return "ok" if s3.get_object(Bucket=bucket, Key="copy.txt")["Body"].read() == b"hello" else "wrong body"

    def delete_objects():
        s3.put_object(Bucket=bucket, Key="d1", Body=b"1")
        s3.put_object(Bucket=bucket, Key="d2", Body=b"2")
        out = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "d1"}, {"Key": "d2"}]})
        return "ok" if len(out.get("Deleted", [])) == 2 else f"deleted {out.get('Deleted')}"

    def range_get():
        body = s3.get_object(Bucket=bucket, Key="a.txt", Range="bytes=1-3")["Body"].read()
        return "ok" if body == b"ell" else f"got {body!r}"

    def list_v2():
        for i in range(3):
            s3.put_object(Bucket=bucket, Key=f"p/{i}", Body=b"x")
        page = s3.list_objects_v2(Bucket=bucket, Prefix="p/", MaxKeys=2)
        rest = s3.list_objects_v2(Bucket=bucket, Prefix="p/", ContinuationToken=page["NextContinuationToken"])
        n = len(page["Contents"]) + len(rest["Contents"])
        delim = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
        prefixes = [p["Prefix"] for p in delim.get("CommonPrefixes", [])]
        return "ok" if n == 3 and "p/" in prefixes else f"{n} keys, prefixes {prefixes}"

    def presigned_get():
        url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "a.txt"}, ExpiresIn=300)
        return "ok" if http("GET", url) == 200 else "failed"

    def presigned_put():
        url = s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "pp.txt"}, ExpiresIn=300)
        code = http("PUT", url, data=b"via presigned put")
        return "ok" if code == 200 and s3.get_object(Bucket=bucket, Key="pp.txt")["Body"].read() == b"via presigned put" else f"{code}"

    def tampered():
        url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "a.txt"}, ExpiresIn=300)
        return status_word(http("GET", tamper(url)))

    def expired():
        url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "a.txt"}, ExpiresIn=1)
        time.sleep(2.5)
        return status_word(http("GET", url))

    def wrong_secret():
        bad = client(endpoint, access, secret + "x")
        try:
            bad.list_objects_v2(Bucket=bucket)
            return "accepted"
        except ClientError as err:
            return f"refused ({err.response['Error']['Code']})"

    def unsigned():
        return status_word(http("GET", f"{endpoint}/{bucket}/a.txt"))

    def conditional_put():
        try:
            s3.put_object(Bucket=bucket, Key="a.txt", Body=b"again", IfNoneMatch="*")
            return "ignored (overwrote)"
        except ClientError as err:
            return f"ok ({err.response['Error']['Code']})"

    return bucket, [
        ("put: content type, metadata, cache control", put_meta),
        ("put with SSE AES256 header", sse),
        ("put with ACL header", acl),
        ("multipart create/upload/complete", multipart),
        ("ListMultipartUploads", list_uploads),
        ("AbortMultipartUpload", abort),
        ("CopyObject", copy),
        ("DeleteObjects", delete_objects),
        ("ranged GET", range_get),
        ("ListObjectsV2 paging + delimiter", list_v2),
        ("presigned GET", presigned_get),
        ("presigned PUT", presigned_put),
        ("tampered presigned URL", tampered),
        ("expired presigned URL", expired),
        ("wrong secret key", wrong_secret),
        ("unsigned GET", unsigned),
        ("If-None-Match: * put on existing key", conditional_put),
    ]


def main():
    servers = [arg.split("=", 3) for arg in sys.argv[1:]]
    results = {}
    names = []
    for name, endpoint, access, secret in servers:
        s3 = client(endpoint, access, secret)
        _, items = checks(s3, endpoint, access, secret)
        for check, fn in items:
            try:
                outcome = fn()
            except ClientError as err:
                outcome = err.response["Error"]["Code"] or str(err)
            except Exception as err:  # report, do not stop
                outcome = f"{type(err).__name__}: {err}"[:60]
            results.setdefault(check, {})[name] = outcome
            if check not in names:
                names.append(check)
    header = ["check"] + [s[0] for s in servers]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for check in names:
        print("| " + " | ".join([check] + [results[check].get(s[0], "") for s in servers]) + " |")


if __name__ == "__main__":
    main()
