"""DICOM media: import of files, folders, DICOMDIR file sets and zips; export of file sets with a DICOMDIR.

The bridge reads and writes media as DTX Studio Clinic does (a File-Set Reader and Creator, see
docs/dicom.md): `fileset` finds the files, `read` maps one file's header onto the store (identity,
category, teeth, capture time, UIDs), `pixels` checks its pixel data, `prepare` is a pool worker's part of
an import (read, check, hash, stage), `volume` stacks a CT series into one multi-frame object, `importer`
runs an import through the service and the imaging pipeline, `wrap` turns non-DICOM images into DICOM
objects, `dicomdir` writes the directory, `export` writes a file set, `commands` are the CLI entry points.

Nothing here imports pydicom at module level except the modules that parse DICOM, so importing this
package costs nothing; the parsing itself runs in the imaging process pool.
"""

from __future__ import annotations

from bridge import __version__

# Our implementation identity in every File Meta Information we write (a UUID-derived UID: the 2.25 root
# needs no registered organisation prefix). Fixed: readers use it to recognise the writer.
IMPLEMENTATION_CLASS_UID = "2.25.16078232864411682975024150706672679185"
IMPLEMENTATION_VERSION_NAME = ("PMSBRIDGE_" + __version__.replace(".", "_"))[:16]  # SH: 16 characters
SOURCE_AE_TITLE = "PMSBRIDGE"

# DICOM facts (PS3.5, PS3.6) that reading, checking and writing files all need: one copy here, where
# importing them costs nothing (pool workers import the reading modules at start).
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR
UNDEFINED_LENGTH = 0xFFFFFFFF  # the length of an element that runs to its delimiter (encapsulated pixels)
