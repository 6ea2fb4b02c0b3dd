"""Imaging: decoding, colour detection, display mapping, orientation, watermarked thumbnails, cache.

Pure functions (`analyze`, `render`) run in a process pool; `pipeline.Imaging` is the event-loop side
that feeds the pool, the file store and the thumbnail cache.
"""
