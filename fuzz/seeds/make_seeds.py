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

# topic_name: flag byte (odd: the rest maps onto an alphabet), then the name.
seeds['topic_name'] = {
    'plain': b'\x00orders.v1',
    'dlq': b'\x00orders.dlq',
    'dot': b'\x00.',
    'dotdot': b'\x00..',
    'three_dots': b'\x00...',
    'empty': b'\x00',
    'space': b'\x00a b',
    'unicode': '\x00caf\u00e9'.encode(),
    'not_utf8': b'\x00ab\xff',
    'nul': b'\x00a\x00b',
    'max_249': b'\x00' + b'a' * 249,
    'too_long_250': b'\x00' + b'a' * 250,
    'dlq_does_not_fit_246': b'\x00' + b'b' * 246,
    'dlq_fits_245': b'\x00' + b'c' * 245,
    'long_invalid': b'\x00' + b'a' * 300 + b'/',
    'alphabet_mode': b'\x01' + bytes(range(256)),
}

# dead_letter_headers, see fuzz/src/checks.rs for the layout.
DLQ = ["keel-dlq-original-topic", "keel-dlq-original-partition", "keel-dlq-original-offset",
       "keel-dlq-original-timestamp", "keel-dlq-original-timestamp-type", "keel-dlq-consumer-group",
       "keel-dlq-error-kind", "keel-dlq-error-type", "keel-dlq-error-message", "keel-dlq-attempts",
       "keel-dlq-failed-at"]
D = {n: i for i, n in enumerate(DLQ)}
def q64(n): return struct.pack('<Q', n % 2**64)
def failure(topic=b'orders', group=b'billing', kind=b'permanent', etype=b'MyError',
            msg=b'bad order', attempts=3, partition=2, offset=40, ts=(1, 1770811200000),
            failed_at=1770811300000, headers=()):
    out = b'\x00' + short(topic) + short(group) + short(kind) + short(etype) + long(msg)
    out += q64(attempts) + q64(partition) + q64(offset)
    out += bytes([ts[0]]) + (q64(ts[1]) if ts[0] else b'')
    out += q64(failed_at)
    for name, value in headers:
        if isinstance(name, int):
            out += bytes([name])
        else:
            out += bytes([200]) + short(name)
        if value is None:
            out += b'\x00'
        else:
            out += b'\x02' + long(value)
    return out
def provenance(**over):
    vals = {'keel-dlq-original-topic': b'orders', 'keel-dlq-original-partition': b'2',
            'keel-dlq-original-offset': b'40', 'keel-dlq-original-timestamp': b'1770811200000',
            'keel-dlq-original-timestamp-type': b'CreateTime', 'keel-dlq-consumer-group': b'g',
            'keel-dlq-error-kind': b'error', 'keel-dlq-error-type': b'E',
            'keel-dlq-error-message': b'boom', 'keel-dlq-attempts': b'5',
            'keel-dlq-failed-at': b'1770811300000'}
    vals.update(over)
    return [(D[k], v) for k, v in vals.items() if v is not False]
seeds['dead_letter_headers'] = {
    'no_headers': failure(),
    'no_timestamp': failure(ts=(0, 0)),
    'log_append_negative': failure(ts=(2, -1), partition=-1, offset=-1001),
    'extremes': failure(attempts=2**32 - 1, partition=2**31 - 1, offset=2**63 - 1,
                        ts=(1, 2**63), failed_at=2**64 - 1),
    'long_error_message': failure(msg=('\u00e9' * 600).encode()),
    'error_message_at_limit': failure(msg=b'x' * 1024),
    'error_message_over_limit': failure(msg=b'x' * 1025),
    'full_provenance': failure(headers=provenance()),
    'dead_lettered_twice': failure(ts=(0, 0), headers=provenance()),
    'missing_attempts': failure(headers=provenance(**{'keel-dlq-attempts': False})),
    'no_value': failure(headers=provenance(**{'keel-dlq-error-kind': None})),
    'not_utf8_value': failure(headers=provenance(**{'keel-dlq-original-topic': b'\xc3\x28'})),
    'bad_number': failure(headers=provenance(**{'keel-dlq-original-offset': b'9223372036854775808'})),
    'bad_timestamp_type': failure(headers=provenance(**{'keel-dlq-original-timestamp-type': b'Later'})),
    'create_time_without_timestamp': failure(headers=provenance(**{'keel-dlq-original-timestamp': False})),
    'not_utf8_names': failure(headers=[(b'\xff\xfe', b'v'), (b'keel-dlq-attempts\xff', b'1'),
                                       (b'keel-dlq-attempts\x00x', b'oops')] + provenance()),
    'duplicates_last_wins': failure(headers=provenance() + [(D['keel-dlq-attempts'], b'9'),
                                                            (D['keel-dlq-attempts'], b'x')]),
    'oversized_value': failure(headers=[(D['keel-dlq-error-message'], b'm' * 60000), (b'big', b'v' * 4000)]),
}

# gateway_bodies: flags (bit 0 batch), event size limit (LE u16 + 64), batch
# count limit (byte + 1), then the JSON body.
def gw(body, batch=False, max_event=4000, max_batch=8):
    return bytes([1 if batch else 0]) + struct.pack('<H', max_event - 64) + bytes([max_batch - 1]) + body
EV = b'{"eventType":"user.created","payload":{"id":1},"key":"u1","version":"2","eventId":"0b6bb1ac-7f44-4d2c-9a0e-3c1f2b9d8e7a"}'
seeds['gateway_bodies'] = {
    'event': gw(EV),
    'event_minimal': gw(b'{"eventType":"t","payload":0}'),
    'event_null_payload': gw(b'{"eventType":"t","payload":null}'),
    'event_no_payload': gw(b'{"eventType":"t"}'),
    'event_blank_type': gw(b'{"eventType":"   ","payload":1}'),
    'event_padded_long_type': gw(b'{"eventType":"' + b'a' * 250 + b' ' * 20 + b'","payload":1}'),
    'event_type_257': gw(b'{"eventType":"' + b'a' * 257 + b'","payload":1}'),
    'event_unknown_field': gw(b'{"eventType":"t","payload":1,"extra":true}'),
    'event_bad_uuid': gw(b'{"eventType":"t","payload":1,"eventId":"nope"}'),
    'event_too_large': gw(b'{"eventType":"t","payload":"' + b'x' * 200 + b'"}', max_event=100),
    'event_float': gw(b'{"eventType":"t","payload":[1.5e300,-0.0,1e-320]}'),
    'event_unicode': gw('{"eventType":"\u00e9v\u00e9nement","payload":{"\u65e5":"\\ud83d\\ude00"},"key":"\\u0000"}'.encode()),
    'not_json': gw(b'\xff{'),
    'batch_list': gw(b'[' + EV + b',{"eventType":"b","payload":[]}]', batch=True),
    'batch_wrapped': gw(b'{"events":[' + EV + b']}', batch=True),
    'batch_empty': gw(b'[]', batch=True),
    'batch_too_many': gw(b'[' + b','.join([b'{"eventType":"t","payload":1}'] * 3) + b']', batch=True, max_batch=2),
    'batch_one_invalid': gw(b'[{"eventType":"t","payload":1},{"eventType":"t"},3]', batch=True),
    'batch_all_too_large': gw(b'[{"eventType":"t","payload":"' + b'x' * 100 + b'"}]', batch=True, max_event=80),
    'batch_mixed_invalid': gw(b'[{"eventType":"t","payload":"' + b'x' * 100 + b'"},{"payload":1}]', batch=True, max_event=80),
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
