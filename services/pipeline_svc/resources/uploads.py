"""Presigned upload URLs: clients put tiles straight into object storage, without credentials."""

from __future__ import annotations

import uuid

from services.common import object_keys
from services.common.errors import FieldViolation, check
from services.common.storage import PRESIGNED_URL_LIFETIME, ObjectStore
from services.common.timeutil import utcnow
from services.pipeline_svc.domain import UploadFile, UploadGrant

MAX_FILES = 5000


def create_upload(store: ObjectStore, *, file_names: list[str]) -> UploadGrant:
    v: list[FieldViolation] = []
    if not file_names:
        v.append(FieldViolation("file_names", "name at least one file"))
    if len(file_names) > MAX_FILES:
        v.append(FieldViolation("file_names", f"at most {MAX_FILES} files per upload"))
    if len(set(file_names)) != len(file_names):
        v.append(FieldViolation("file_names", "file names must be unique"))
    for i, name in enumerate(file_names):
        if "/" in name:
            v.append(FieldViolation(f"file_names[{i}]", "a plain file name, without directories"))
    check(v[:50])
    upload_id = uuid.uuid4().hex
    files = []
    for i, name in enumerate(file_names):
        key = object_keys.upload_key(upload_id, name, field=f"file_names[{i}]")
        files.append(UploadFile(file_name=name, key=key, url=store.presign_put(key, PRESIGNED_URL_LIFETIME)))
    return UploadGrant(upload_id=upload_id, files=files, expire_time=utcnow() + PRESIGNED_URL_LIFETIME)
