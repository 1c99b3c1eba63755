"""The study lock in an S3 bucket, taken with S3's conditional writes (study.search.folder.lock).

`put_object(IfNoneMatch='*')` creates the lock only where there is none (HTTP 412 otherwise), and a stale
lock is replaced with `put_object(IfMatch=<the ETag read>)`, which fails when another driver replaced it
since: a compare-and-swap, so of drivers racing for the same lock exactly one wins. boto3 reads the same
environment as pyarrow (AWS_ENDPOINT_URL, credentials, region). A server that does not implement
conditional writes answers NotImplemented (501): the caller then falls back to check-then-write.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable
from urllib.parse import parse_qs

from study.errors import UserError

log = logging.getLogger("study.search")
_EXISTS = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
_UNSUPPORTED = ("NotImplemented", "501")


class _Unsupported(Exception):
    pass


class S3Lock:
    def __init__(self, client: Any, bucket: str, key: str, url: str):
        self.client, self.bucket, self.key, self.url = client, bucket, key, url

    @classmethod
    def of(cls, store: Any, name: str) -> "S3Lock | None":
        """The lock object `name` of an s3:// store, None for other stores (or without boto3)."""
        scheme, _, rest = store.uri.partition("://")
        if scheme.lower() != "s3":
            return None
        try:
            import boto3
        except ImportError:
            return None
        path, _, query = rest.partition("?")
        bucket, _, prefix = path.strip("/").partition("/")
        options = {k: v[-1] for k, v in parse_qs(query).items()}
        kwargs: dict[str, Any] = {}
        if options.get("endpoint_override"):  # pyarrow's URI options, where the URI carries them
            host = options["endpoint_override"]
            kwargs["endpoint_url"] = host if "://" in host else f"{options.get('scheme', 'https')}://{host}"
        if options.get("region"):
            kwargs["region_name"] = options["region"]
        key = f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name
        return cls(boto3.client("s3", **kwargs), bucket, key, store.url(name))

    def _code(self, e: Exception) -> str:
        response = getattr(e, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _UNSUPPORTED or status in _UNSUPPORTED:
            raise _Unsupported(code or status)
        return "exists" if code in _EXISTS or status in _EXISTS else ""

    def _put(self, record: dict, **condition: str) -> bool:
        """One conditional PUT; False when its condition failed."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(record).encode(),
                                   ContentType="application/json", **condition)
            return True
        except ClientError as e:
            if self._code(e) == "exists":
                return False
            raise OSError(f"{self.url}: {e}") from None
        except BotoCoreError as e:  # no credentials, no endpoint
            raise OSError(f"{self.url}: {e}") from None

    def _get(self) -> tuple[str, str] | None:
        """(text, ETag) of the lock, None when there is none."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
            return got["Body"].read().decode("utf-8", "replace"), got["ETag"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise OSError(f"{self.url}: {e}") from None
        except BotoCoreError as e:
            raise OSError(f"{self.url}: {e}") from None

    def acquire(self, record: dict, judge: Callable[[dict | None], dict | None],
                message: Callable[[dict], str]) -> bool:
        """Take the lock (True), refuse in one line (UserError), or False where the server has no
        conditional writes. `judge` is StudyLock's: the record when it holds the study, None when stale."""
        try:
            for _ in range(5):
                if self._put(record, IfNoneMatch="*"):
                    return True
                got = self._get()
                if got is None:
                    continue  # released since: try to create it again
                text, etag = got
                try:
                    data = json.loads(text)
                    if not isinstance(data, dict) or "pid" not in data:
                        raise ValueError("not a lock record")
                except ValueError as e:  # an S3 PUT is whole: this one is damaged, never stale
                    data = {"unreadable": str(e)}
                held = judge(data)
                if held is not None:
                    raise UserError(message(held))
                log.warning("taking over the stale lock %s", self.url)
                if self._put(record, IfMatch=etag):
                    return True
            raise UserError(f"{self.url}: could not take the lock (another driver keeps taking it)")
        except _Unsupported as e:
            log.warning("%s: the object store has no conditional writes (%s): the lock is check-then-write",
                        self.url, e)
            return False
