"""The HTTP face of the archive (``medarchive serve``): DICOMweb (PS3.18), the web page, health and metrics.

Routes parse and present only; the work is in :mod:`archive.services`, the same
functions the CLI and the workers call. Handlers are plain ``def`` functions
(FastAPI runs them in its thread pool), so catalog and blob reads never block the
event loop; large answers are streamed part by part.
"""
