#!/usr/bin/env python3
"""Writes the seed corpora (fuzz/corpus/<target>/) in the byte layout that
fuzz/src/checks.rs reads. Run from fuzz/: python3 seeds/make_seeds.py"""
import os, struct

def short(b): return bytes([len(b)]) + b
def long(b): return struct.pack('<H', len(b)) + b

def message(payload=b'', no_payload=False, key=None, ts=None, headers=()):
    out = bytes([0xFF if no_payload else 0]) + long(payload)
    out += bytes([1 if key is None else 0]) + short(key or b'')
    if ts is None:
        out += bytes([0])
    else:
        kind, ms = ts
        out += bytes([kind]) + struct.pack('<q', ms)
    for sel, name, value in headers:
        out += bytes([sel]) + short(name) + bytes([0 if value is None else 1]) + long(value or b'')
    return out

ID = b'0b6bb1ac-7f44-4d2c-9a0e-3c1f2b9d8e7a'
BODY = (b'{"eventId":"' + ID + b'","eventType":"user.created","version":"1.0",'
        b'"timestamp":"2026-02-11T12:00:00Z","payload":{"user_id":"u1","n":1.5e300}}')
ANY = 200  # selector past the known names: the name comes from the input
seeds = {
  'envelope_decode': {
    'full': message(BODY, key=b'user-1', ts=(1, 1770811200000),
                    headers=[(0, b'', ID), (1, b'', b'user.created'), (2, b'', b'1.0'),
                             (ANY, b'trace-id', b'abc')]),
    'headers_only': message(b'{"payload":[1,2,3]}', ts=(2, 1770811200000),
                            headers=[(0, b'', ID), (1, b'', b'x'), (2, b'', b'2')]),
    'mismatch': message(BODY, headers=[(1, b'', b'user.deleted')]),
    'not_json': message(b'\xff\xfe not json', ts=(1, 0)),
    'empty_value': message(b''),
    'no_value': message(no_payload=True),
    'dup_and_null_headers': message(BODY, headers=[(ANY, b'a', b'1'), (ANY, b'a', None),
                                                   (ANY, b'a', b'\xff\x00\xfe'), (0, b'', ID),
                                                   (0, b'', ID)]),
    'non_utf8_reserved_header': message(b'{"payload":1}', ts=(1, 5),
                                        headers=[(0, b'', b'\xc3\x28'), (1, b'', b't'), (2, b'', b'1')]),
    'reserved_header_no_value': message(BODY, headers=[(1, b'', None)]),
    'kafka_ts_min': message(b'{"eventId":"' + ID + b'","eventType":"t","version":"1","payload":null}',
                            ts=(1, -(2**63))),
    'kafka_ts_max': message(b'{"eventId":"' + ID + b'","eventType":"t","version":"1","payload":{}}',
                            ts=(2, 2**63 - 1)),
    'kafka_ts_year_zero': message(b'{"eventId":"' + ID + b'","eventType":"t","version":"1","payload":{}}',
                                  ts=(1, -62167219200000 - 1000)),
    'bad_uuid': message(b'{"eventId":"nope","eventType":"t","version":"1","timestamp":"2026-01-01T00:00:00Z","payload":0}'),
    'wrong_field_type': message(b'{"eventId":1,"eventType":"t","version":"1","payload":0}'),
    'offset_timestamp': message(b'{"eventId":"' + ID + b'","eventType":"t","version":"1",'
                                b'"timestamp":"2026-02-11T12:00:00.123456789+05:30","payload":"x"}'),
    'oversized_header': message(BODY, headers=[(ANY, b'big', b'v' * 8000)]),
  },
  'object_key': {
    'plain': b'\x00photos/2026/cat.jpg',
    'leading_slash': b'\x00/a/b',
    'leading_slash_allowed': b'\x01/a/b',
    'double_slash': b'\x00a//b',
    'dot_segments': b'\x00a/../b',
    'dot_allowed': b'\x07./a/../b//c',
    'control': b'\x00a\x07b',
    'empty': b'\x00',
    'unicode': '\x00clé/日本語/😀'.encode(),
    'not_utf8': b'\x00\xff\xfe/x',
    'too_long': b'\x00' + b'k' * 1025,
  },
}

def var(sel, value, name=None):
    out = bytes([sel])
    if name is not None:
        out += short(name)
    return out + short(value)

K = {n: i for i, n in enumerate([
    "ENABLE_KAFKA", "KAFKA_BROKERS", "KAFKA_CLIENT_ID", "KAFKA_GROUP_ID",
    "KAFKA_CONNECTION_TIMEOUT", "KAFKA_REQUEST_TIMEOUT", "KAFKA_RETRY_ATTEMPTS",
    "KAFKA_RETRY_BACKOFF_MS", "KAFKA_DELIVERY_TIMEOUT", "KAFKA_LOG_LEVEL",
    "KAFKA_MAX_BATCH_SIZE", "KAFKA_TRANSACTIONAL_ID", "KAFKA_RDKAFKA_COMPRESSION_TYPE",
    "KAFKA_RDKAFKA_SASL_PASSWORD", "KAFKA_RDKAFKA_SECURITY_PROTOCOL", "KAFKA_RDKAFKA_",
    "APP_ENV", "KEEL_ENV", "DEBUG", "AWS_REGION", "AWS_S3_BUCKET", "AWS_S3_ENDPOINT",
    "AWS_S3_FORCE_PATH_STYLE"])}
config = {
    'typical': var(K['ENABLE_KAFKA'], b'true') + var(K['KAFKA_BROKERS'], b'a:9092,b:9092')
               + var(K['KAFKA_CLIENT_ID'], b'svc') + var(K['KAFKA_GROUP_ID'], b'g')
               + var(K['KAFKA_CONNECTION_TIMEOUT'], b'3000') + var(K['KAFKA_LOG_LEVEL'], b'warn'),
    'bad_numbers': var(K['KAFKA_RETRY_ATTEMPTS'], b'-1') + var(K['KAFKA_MAX_BATCH_SIZE'], b'99999999999999999999')
                   + var(K['KAFKA_REQUEST_TIMEOUT'], b'1e9') + var(K['KAFKA_RETRY_BACKOFF_MS'], b''),
    'secrets': var(K['KAFKA_RDKAFKA_SASL_PASSWORD'], b'hunter2-secret') + var(K['KAFKA_RDKAFKA_SECURITY_PROTOCOL'], b'bogus')
               + var(K['KAFKA_RDKAFKA_'], b'x'),
    'production': var(K['KEEL_ENV'], b'PROD') + var(K['APP_ENV'], b'production') + var(K['KAFKA_BROKERS'], b'')
                  + var(K['KAFKA_TRANSACTIONAL_ID'], b'tx-1') + var(K['DEBUG'], b'true'),
    'unknown_names': var(250, b'v', name=b'KAFKA_RDKAFKA_FETCH_MAX_BYTES') + var(250, b'1', name=b'KAFKA_\xff')
                     + var(250, b'x', name=b''),
    's3': var(K['AWS_REGION'], b'eu-west-1') + var(K['AWS_S3_BUCKET'], b'my-bucket')
          + var(K['AWS_S3_ENDPOINT'], b'http://127.0.0.1:8014') + var(K['AWS_S3_FORCE_PATH_STYLE'], b'yes'),
    's3_bad': var(K['AWS_S3_BUCKET'], b'Bad_Bucket..') + var(K['AWS_S3_ENDPOINT'], b'not a url')
              + var(K['AWS_S3_FORCE_PATH_STYLE'], b'maybe') + var(K['KEEL_ENV'], b'prod'),
}
seeds['kafka_config'] = config
seeds['s3_config'] = config
seeds['presign_expiry'] = {
    'zero': b'',
    'half_second': struct.pack('<QQ', 0, 500_000_000),
    'one_second': struct.pack('<QQ', 1, 0),
    'seven_days': struct.pack('<QQ', 7 * 24 * 3600, 0),
    'seven_days_and_a_nano': struct.pack('<QQ', 7 * 24 * 3600, 1),
    'max': struct.pack('<QQ', 2**64 - 1, 999_999_999),
}
for target, files in seeds.items():
    d = os.path.join('corpus', target)
    os.makedirs(d, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(d, name), 'wb') as f:
            f.write(data)
print('ok')
# s3_error seeds were written by hand (see fuzz/corpus/s3_error/): status
# (LE u16 + 100), code selector, code, message, retry-after, body.
