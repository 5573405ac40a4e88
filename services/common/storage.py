"""Object storage through the `minio` client: one bucket, keys laid out by
services/common/object_keys.py (README "Object keys"). Every key that comes from a request is
checked by `safe_key`; a registered model's bytes by `verified`."""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error

from services.common.errors import (
    DomainError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from services.common.settings import StorageSettings

log = logging.getLogger(__name__)

_KEY_PART = re.compile(r"^[A-Za-z0-9._\-]+$")
MAX_KEY_LENGTH = 512
# How long a presigned upload or download URL stays valid.
PRESIGNED_URL_LIFETIME = timedelta(hours=2)


def safe_key(key: str, *, field: str, prefix: str = "") -> str:
    """Returns `key` if it is a plain relative object key (under `prefix`, when given).

    Refuses traversal ("..", "."), absolute paths, empty segments and odd bytes, so no request can
    reach outside its prefix.
    """
    parts = key.split("/")
    ok = (
        0 < len(key) <= MAX_KEY_LENGTH
        and all(p not in ("", ".", "..") and _KEY_PART.match(p) for p in parts)
        and key.startswith(prefix)
    )
    if not ok:
        where = f" under '{prefix}'" if prefix else ""
        raise InvalidArgumentError.of(
            field, f"{key!r} is not a valid object key{where} (letters, digits, '._-' and '/' only)"
        )
    return key


def verified(data: bytes, *, key: str, sha256: str) -> bytes:
    """`data` if its SHA-256 is `sha256` (hex); FAILED_PRECONDITION otherwise: the object changed
    since its hash was recorded, or none was, and loading it would run unknown weights."""
    if not sha256:
        raise FailedPreconditionError(f"object {key!r} has no recorded sha256; refusing to load it unverified")
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256.lower():
        raise FailedPreconditionError(
            f"object {key!r} does not match the sha256 recorded when it was registered "
            f"(recorded {sha256[:12]}…, found {actual[:12]}…); it was changed or replaced in storage")
    return data


_HASH_CHUNK = 1 << 20


def _is_missing(exc: S3Error | InvalidResponseError) -> bool:
    # rclone answers some 404s with a body minio cannot parse (InvalidResponseError).
    if isinstance(exc, S3Error):
        return exc.code in ("NoSuchKey", "NoSuchObject", "NotFound")
    return getattr(exc, "_code", None) == 404


@dataclass(frozen=True)
class StoredObject:
    key: str
    modified: datetime


class ObjectTooLargeError(DomainError):
    """An object larger than what its reader accepts."""

    def __init__(self, key: str, size: int, limit: int, *, at_least: bool = False) -> None:
        held = f"more than {limit:,}" if at_least else f"{size:,}"
        super().__init__(f"holds {held} bytes; at most {limit:,}")
        self.key, self.size, self.limit = key, size, limit


class ObjectStore:
    """A bucket on an S3 API server, with the few operations the services need."""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        # Short timeouts and a few retries: an outage surfaces as UNAVAILABLE, not a hang.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=60),
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            maxsize=16,
        )
        secret = settings.secret_key.get_secret_value()
        self._client = Minio(
            settings.endpoint, access_key=settings.access_key, secret_key=secret,
            secure=settings.secure, region=settings.region, http_client=http,
        )
        # Presigned URLs are signed for the host the client will use.
        self._public = Minio(
            settings.public_endpoint or settings.endpoint, access_key=settings.access_key,
            secret_key=secret, secure=settings.secure, region=settings.region,
        )

    def ensure_bucket(self) -> None:
        try:
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)
        except (S3Error, InvalidResponseError) as exc:
            # rclone answers "bucket exists" races with InvalidResponseError.
            if not self._client.bucket_exists(self.bucket):
                raise UnavailableError("object store refused to create the bucket") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise UnavailableError("object store unreachable") from exc

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.put_stream(key, io.BytesIO(data), len(data), content_type)

    def put_stream(self, key: str, stream: BinaryIO, length: int, content_type: str) -> None:
        try:
            self._client.put_object(self.bucket, key, stream, length, content_type=content_type)
        except urllib3.exceptions.HTTPError as exc:
            raise UnavailableError("object store unreachable") from exc

    def _open(self, key: str) -> Any:
        """The object's response, its body not read yet: NotFoundError, or UnavailableError."""
        try:
            return self._client.get_object(self.bucket, key)
        except (S3Error, InvalidResponseError) as exc:
            if _is_missing(exc):
                raise NotFoundError(f"object {key!r}") from exc
            raise UnavailableError("object store error") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise UnavailableError("object store unreachable") from exc

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """The object's bytes; with `max_bytes`, ObjectTooLargeError for a larger object, judged
        from its length before its body is read."""
        response = self._open(key)
        try:
            if max_bytes is None:
                return response.read()
            declared = response.headers.get("Content-Length")
            if declared is not None and int(declared) > max_bytes:
                raise ObjectTooLargeError(key, int(declared), max_bytes)
            data = response.read(max_bytes + 1)  # a server that declared no length
            if len(data) > max_bytes:
                raise ObjectTooLargeError(key, len(data), max_bytes, at_least=True)
            return data
        finally:
            response.close()
            response.release_conn()

    def sha256(self, key: str) -> str:
        """The SHA-256 (hex) of the object's content, read in chunks (memory stays bounded
        however large the object)."""
        response = self._open(key)
        digest = hashlib.sha256()
        try:
            for chunk in response.stream(_HASH_CHUNK):
                digest.update(chunk)
        except urllib3.exceptions.HTTPError as exc:
            raise UnavailableError("object store unreachable") from exc
        finally:
            response.close()
            response.release_conn()
        return digest.hexdigest()

    def exists(self, key: str) -> bool:
        try:
            self._client.stat_object(self.bucket, key)
            return True
        except (S3Error, InvalidResponseError) as exc:
            if _is_missing(exc):
                return False
            raise UnavailableError("object store error") from exc

    def list_keys(self, prefix: str) -> list[str]:
        return [o.key for o in self.list_objects(prefix)]

    def list_objects(self, prefix: str) -> list[StoredObject]:
        """Every object under `prefix`, with when it was last written."""
        return [StoredObject(o.object_name, o.last_modified or datetime.min.replace(tzinfo=UTC))
                for o in self._listing(prefix, recursive=True) if o.object_name]

    def list_folders(self, prefix: str) -> list[str]:
        """The `prefix`-level folders (`jobs/j-1/`, ...) under `prefix`."""
        return [o.object_name for o in self._listing(prefix, recursive=False) if o.is_dir and o.object_name]

    def _listing(self, prefix: str, *, recursive: bool) -> list[Any]:
        try:
            return list(self._client.list_objects(self.bucket, prefix, recursive=recursive))
        except (S3Error, InvalidResponseError) as exc:
            raise UnavailableError("object store error") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise UnavailableError("object store unreachable") from exc

    def delete_many(self, keys: list[str]) -> None:
        """Best-effort removal (used to undo partial work); failures are logged, not raised."""
        if not keys:
            return
        try:
            errors = list(self._client.remove_objects(self.bucket, (DeleteObject(k) for k in keys)))
            for err in errors:
                log.warning("could not delete %s: %s", err.name, err.code)
        except Exception:
            log.exception("could not delete %d objects", len(keys))

    def delete_prefix(self, prefix: str) -> None:
        self.delete_many(self.list_keys(prefix))

    def presign_put(self, key: str, expires: timedelta) -> str:
        return self._public.presigned_put_object(self.bucket, key, expires=expires)

    def presign_get(self, key: str, expires: timedelta) -> str:
        return self._public.presigned_get_object(self.bucket, key, expires=expires)
