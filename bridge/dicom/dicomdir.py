"""Writing a DICOMDIR (the Basic Directory IOD, PS3.3 F and PS3.10) for a file set the exporter wrote.

Records come in the standard's hierarchy, PATIENT > STUDY > SERIES > IMAGE, depth first; each holds the
keys PS3.3 F.5 requires (type 1 ones always valued; the exporter fills what a file lacked), each record in
the file set's one Specific Character Set (the Basic Directory IOD has none at its top level). Offsets are
byte positions of item tags from the start of the file: the directory is written once with zero offsets,
the item positions are read back, the offsets filled in and the directory written again (offsets are
fixed-size UL values, so no position moves).
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass, field
from typing import Any

from bridge.dicom import (
    EXPLICIT_LE,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    MEDIA_STORAGE_DIRECTORY,
    SOURCE_AE_TITLE,
)

FILE_SET_ID = "PMSBRIDGE"
_IN_USE = 0xFFFF


@dataclass
class Node:
    """One directory record and the records below it."""

    kind: str  # PATIENT | STUDY | SERIES | IMAGE
    keys: dict[str, Any]
    children: list[Node] = field(default_factory=list)


def _record(node: Node, charset: str) -> Any:
    from pydicom.dataset import Dataset

    record = Dataset()
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = _IN_USE
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = node.kind
    if charset:
        record.SpecificCharacterSet = charset
    for keyword, value in node.keys.items():
        setattr(record, keyword, value)
    return record


def _flatten(nodes: list[Node], charset: str, out: list[tuple[Node, Any]]) -> None:
    for node in nodes:
        out.append((node, _record(node, charset)))
        _flatten(node.children, charset, out)


def _encode(ds: Any) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def build(patients: list[Node], charset: str) -> bytes:
    """The bytes of a DICOMDIR listing `patients` and everything below them."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import UID

    flat: list[tuple[Node, Any]] = []
    _flatten(patients, charset, flat)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(MEDIA_STORAGE_DIRECTORY)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(f"2.25.{uuid.uuid4().int}")
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_LE)
    ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta.SourceApplicationEntityTitle = SOURCE_AE_TITLE
    ds.FileSetID = FILE_SET_ID
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = Sequence([record for _node, record in flat])
    first = _encode(ds)
    read_back = pydicom.dcmread(io.BytesIO(first))
    where = {
        id(node): item.seq_item_tell
        for (node, _r), item in zip(flat, read_back.DirectoryRecordSequence, strict=True)
    }
    records = {id(node): record for node, record in flat}

    def link(level: list[Node]) -> None:
        for index, node in enumerate(level):
            record = records[id(node)]
            if index + 1 < len(level):
                record.OffsetOfTheNextDirectoryRecord = where[id(level[index + 1])]
            if node.children:
                record.OffsetOfReferencedLowerLevelDirectoryEntity = where[id(node.children[0])]
                link(node.children)

    link(patients)
    if patients:
        ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = where[id(patients[0])]
        ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = where[id(patients[-1])]
    final = _encode(ds)
    if len(final) != len(first):
        raise AssertionError("DICOMDIR offsets changed the directory's layout")
    return final
