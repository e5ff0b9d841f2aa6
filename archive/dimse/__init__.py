"""The DICOM network service (DIMSE, PS3.7): ``medarchive scp``.

Modalities and other PACS send, query and retrieve here as they would at
Orthanc or dcm4chee-arc. :mod:`~archive.dimse.server` builds the pynetdicom
application entity; one module per service answers its requests —
:mod:`~archive.dimse.store` (C-STORE into the incoming area, then the
watcher's stable-study path), :mod:`~archive.dimse.commitment` (Storage
Commitment Push Model), :mod:`~archive.dimse.find` (C-FIND, the QIDO
queries), :mod:`~archive.dimse.retrieve` (C-GET and C-MOVE) — and
:mod:`~archive.dimse.access` decides who may connect and keeps the audit rows.
"""
