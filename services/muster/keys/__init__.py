"""The keys service: the cluster's secure cookie key and launcher key pair, sealed at rest, rotated."""

from muster.keys.crypto import decrypt_password_with_files, ensure_master_key

__all__ = ["decrypt_password_with_files", "ensure_master_key"]
