"""What an input location holds: which entries are scored and which are skipped, with their reasons."""

import numpy as np
import soundfile as sf

from gunsound.inputs import list_inputs


def test_an_extensionless_file_in_a_local_folder_is_skipped_unless_named_on_its_own(tmp_path):
    """A README or a LICENSE beside the recordings was scored as audio and became an error row (`score --strict`
    then failed a folder whose audio was all fine); S3 keys keep being tried (tests/test_bad_inputs.py)."""
    sf.write(tmp_path / "shot.wav", np.zeros(1600, np.float32), 16000)
    (tmp_path / "README").write_text("recorded at the north gate\n")
    (tmp_path / "LICENSE").write_text("CC-BY 4.0\n")
    listed = list_inputs(str(tmp_path))
    assert listed.files == [str(tmp_path / "shot.wav")]
    assert set(listed.skipped) == {str(tmp_path / "README"), str(tmp_path / "LICENSE")}
    assert all(why.startswith("no extension: in a local folder not taken for audio") for why in listed.skipped.values())
    sf.write(tmp_path / "take_7", np.zeros(1600, np.float32), 16000, format="WAV")
    assert list_inputs(str(tmp_path / "take_7")).files == [str(tmp_path / "take_7")]  # named: scored


def test_an_extensionless_s3_key_is_tried_as_audio(s3_server, tmp_path):
    """S3 keys often carry no extension: they are scored (an unreadable one becomes that file's error row)."""
    import boto3

    from gunsound import storage

    storage.configure_s3(s3_server)
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="recordings")
    sf.write(tmp_path / "take.wav", np.zeros(1600, np.float32), 16000)
    client.upload_file(str(tmp_path / "take.wav"), "recordings", "gate/take_7")
    client.put_object(Bucket="recordings", Key="gate/notes.txt", Body=b"north gate")
    listed = list_inputs("s3://recordings/gate")
    assert listed.files == ["s3://recordings/gate/take_7"] and list(listed.skipped) == ["s3://recordings/gate/notes.txt"]
