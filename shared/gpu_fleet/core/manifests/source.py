"""A user's file, as bytes, into documents: the one set of rules every reader of files shares.

``kubectl runs submit -f``, ``gpu-fleet validate`` and the scenario loader used to read files
three ways, and each failed its own way on the same bad file (issue 19): a binary file ended in
a ``UnicodeDecodeError`` traceback, an empty file "submitted" nothing with exit 0, and a file of
only ``---`` separators came back as ``items[0]: expected mapping, got null``.  They now all
call ``load_source`` with the file's bytes and its name, and get either documents or one
``ManifestError`` whose single line names the file and the reason:

* the bytes must be UTF-8 (a byte-order mark is allowed and dropped), as YAML 1.2 and JSON
  files are in practice;
* the text must hold at least one document: an empty file, or one of only comments, ``---``
  separators and empty documents, is refused rather than silently doing nothing;
* everything ``load_documents`` checks: syntax with line and column, duplicate keys, and the
  bounds after alias expansion (``documents[i]: more than N nodes ...``).

Reading the bytes stays with the caller (this package never does I/O), so an unreadable file is
still the caller's one-line ``error: FILE: <strerror>``.
"""

from __future__ import annotations

from gpu_fleet.core.manifests.documents import load_documents
from gpu_fleet.core.manifests.errors import FieldError, ManifestError


def decode_text(data: bytes, source: str) -> str:
    """The UTF-8 text of ``data``; a ManifestError naming the first bad byte otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        reason = (
            f"not UTF-8 text (invalid byte at offset {exc.start}); "
            "YAML and JSON files must be UTF-8"
        )
        raise ManifestError([FieldError(source, reason)], source=source) from None


def load_source(data: bytes, source: str) -> list[object]:
    """Every document of a file (``None`` for an empty one, so indices match the file).

    Raises ManifestError when the file is not UTF-8, holds no document at all, or fails
    ``load_documents``.
    """
    text = decode_text(data, source)
    if not text.strip():
        raise ManifestError([FieldError(source, "the file is empty")], source=source)
    documents = load_documents(text, source)
    if all(doc is None for doc in documents):
        reason = "no documents (only comments, '---' separators or empty documents)"
        raise ManifestError([FieldError(source, reason)], source=source)
    return documents
