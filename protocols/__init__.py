"""One module per PMS protocol: pure parse (bytes -> PatientRequest) and render (Outcome -> bytes).

No database, no sockets, no clock in here: every captured PMS message replays as a pure unit test.
Shared parsing (encodings, INI files, dates, sex codes) lives in `protocols.common`.
"""
