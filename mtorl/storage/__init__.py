"""Storage: the one place that turns a URI + the environment into pyarrow / boto3 clients.

A URI is ``s3://bucket/key`` or a local path. Credentials come from the standard AWS variables,
else the embedded SeaweedFS store's state file (see :mod:`mtorl.storage.settings`).
The embedded store itself lives in :mod:`mtorl.storage.seaweed` (imported on demand).
"""

from mtorl.storage.errors import StorageError
from mtorl.storage.settings import S3Settings, boto3_client, pyarrow_s3, pyarrow_s3_keyless, s3_settings, store_dir
from mtorl.storage.uri import (
    delete_prefix,
    download_dir,
    ensure_bucket,
    exists,
    is_s3,
    join,
    list_files,
    read_bytes,
    read_json,
    resolve,
    upload_dir,
    write_bytes,
    write_json,
)

__all__ = [
    "S3Settings", "StorageError", "boto3_client", "delete_prefix", "download_dir", "ensure_bucket",
    "exists", "is_s3", "join", "list_files", "pyarrow_s3", "pyarrow_s3_keyless", "read_bytes", "read_json", "resolve",
    "s3_settings", "store_dir", "upload_dir", "write_bytes", "write_json",
]
