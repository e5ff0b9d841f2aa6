"""Objects kept whole (no pixels): a codec configuration the codec registry accepts, the same elements back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from archive.catalog.models import Encoding, Instance
from archive.codecs import get_codec
from archive.kinds import EncodingKind, StorageMode
from archive.services.ingest import Outcome, ingest_paths
from archive.services.retrieve import retrieve_study
from archive.services.runtime import Archive
from tests.conftest import shared_data
from tests.dicom_compare import header_differences, read

SOURCES = {
    "pydicom-rtstruct.dcm": lambda: Path(str(get_testdata_file("rtstruct.dcm"))),  # implicit VR, no file meta
    "barre-rtstruct.dcm": lambda: shared_data() / "misc-barre" / "rtstruct.dcm",  # implicit VR with file meta
}


def _dataset_bytes(part10: bytes) -> bytes:
    """The data set after the preamble and file meta (the whole input when it has neither)."""
    if part10[128:132] != b"DICM":
        return part10
    return part10[144 + int.from_bytes(part10[140:144], "little"):]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_whole_object(archive: Archive, tmp_path: Path, name: str) -> None:
    source = tmp_path / "in" / name
    source.parent.mkdir()
    shutil.copyfile(SOURCES[name](), source)
    report = ingest_paths(archive, [source])
    assert [o.outcome for o in report.outcomes] == [Outcome.STORED], report.outcomes

    with archive.unit_of_work() as uow:
        instance = uow.session.scalars(select(Instance)).one()
        (encoding,) = uow.session.scalars(select(Encoding).where(Encoding.instance_id == instance.id)).all()
        assert instance.storage_mode is StorageMode.WHOLE and encoding.kind is EncodingKind.WHOLE
        assert instance.header_dictionary is None
        codec = get_codec(encoding.codec_config)  # raised CodecError for {"id": "zstd", "level": 0, "scope": ...}
        assert codec.codec_id == encoding.codec_id == "zstd"
        assert codec.get_config() == encoding.codec_config
        assert encoding.num_frames == 0 and not encoding.frames
        assert uow.read_header(instance.header_blob, None) == source.read_bytes(), "the header blob is the file"
        assert encoding.bytes_before == source.stat().st_size
        syntax = instance.transfer_syntax_uid

    (study,) = report.studies
    (as_received,) = retrieve_study(archive, study, tmp_path / "original", transfer_syntax="original").files
    assert as_received.transfer_syntax == syntax
    assert _dataset_bytes(as_received.path.read_bytes()) == _dataset_bytes(source.read_bytes())
    (native,) = retrieve_study(archive, study, tmp_path / "explicit", transfer_syntax="explicit-le").files
    original = read(source)
    assert not header_differences(original, read(native.path))
    assert not header_differences(original, read(as_received.path))
