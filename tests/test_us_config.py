"""The PMS profile sections [dexis], [dentrix], [eaglesoft], [cliniview]: defaults, checks, doctor."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bridge.config import ConfigError, load_settings
from bridge.install import init_home
from tests.conftest import pms_bridge_command


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pms-bridge.ini"
    path.write_text("[api]\ntoken = x\n" + text, encoding="utf-8")
    return path


def test_profile_defaults(tmp_path: Path) -> None:
    settings = load_settings(str(write(tmp_path, "")))
    for name in ("dexis", "dentrix", "eaglesoft", "cliniview"):
        profile = getattr(settings, name)
        assert (profile.pms_system, profile.practice_id, profile.id_field) == (name, "", "pms_id")
        assert (profile.encoding, profile.thumbnails, profile.thumbnail_dir) == ("auto", False, None)
    assert (settings.dexis.locale, settings.dexis.info_file_sx_m, settings.dexis.integrator_dir) == (
        "en-us",
        "unknown",
        None,
    )
    assert settings.dentrix.locale == "en-us"
    assert (settings.eaglesoft.legacy_id_suffix, settings.eaglesoft.ini_section) == (0, "Patient")
    assert settings.eaglesoft.ini_keys["id"] == "PatientNumber"
    assert "ssn" not in settings.eaglesoft.ini_keys
    assert settings.cliniview.ini_keys == {
        "id": "PatientID",
        "first_name": "FirstName",
        "last_name": "LastName",
        "birth_date": "BirthDate",
        "sex": "Sex",
    }
    assert (settings.cliniview.date_format, settings.cliniview.ini_date_format) == (
        "MM/dd/yyyy",
        "MM/dd/yyyy",
    )


def test_profile_values_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PMS_BRIDGE__DENTRIX__ID_FIELD", "chart_number")
    path = write(
        tmp_path,
        "[dentrix]\nthumbnails = yes\nthumbnail_dir = SmartImage\nintegrator_dir = \\\\server\\share\\dexis\n"
        "[cliniview]\nini_keys = id=Nr, last_name=Name\nini_date_format = yyyy-MM-dd\n",
    )
    settings = load_settings(str(path))
    assert settings.dentrix.id_field == "chart_number"
    assert settings.dentrix.thumbnail_dir == tmp_path / "SmartImage"  # relative to the config file
    assert settings.cliniview.ini_keys == {"id": "Nr", "last_name": "Name"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[dexis]\nlocale = en-au\n", "[dexis] locale = 'en-au'"),
        ("[dexis]\nid_field = ssn\n", "allowed: pms_id | chart_number"),
        ("[cliniview]\nini_keys = id=PatientID, ssn=SSN\n", "names: id, first_name, middle_name"),
        ("[cliniview]\nini_keys = id\n", "[cliniview] ini_keys = 'id'"),
        ("[cliniview]\ndate_format = MM/yyyy\n", "a .NET date format with day, month and year"),
        ("[eaglesoft]\nlegacy_id_suffix = 50\n", "a whole number from 0 to 20"),
        ("[dentrix]\nthumbnails = yes\n", "[dentrix] thumbnails = yes needs thumbnail_dir"),
        (
            "[eaglesoft]\nlegacy_id_suffix = 5\nid_field = chart_number\n",
            "legacy_id_suffix truncates patient numbers, not chart numbers",
        ),
    ],
)
def test_bad_profile_values_are_one_line_errors(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(str(write(tmp_path, text)))
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_init_writes_the_profiles_documented_and_loadable(tmp_path: Path) -> None:
    settings, _done = init_home(tmp_path / "home")
    text = settings.path.read_text(encoding="utf-8")
    for section in ("[dexis]", "[dentrix]", "[eaglesoft]", "[cliniview]"):
        assert section in text
    assert "legacy_id_suffix = 0" in text and "info_file_sx_m = unknown" in text
    assert load_settings(str(settings.path)).cliniview.ini_section == "Patient"


def test_doctor_checks_the_profile_folders(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x", encoding="utf-8")
    (tmp_path / "thumbs").mkdir()
    good = write(tmp_path, f"[dentrix]\nthumbnails = yes\nthumbnail_dir = {tmp_path / 'thumbs'}\n")
    out = subprocess.run(
        [*pms_bridge_command(), "doctor", "--config", str(good)], capture_output=True, timeout=60, check=False
    ).stdout.decode()
    assert f"ok   PMS profile folders writable: [dentrix] thumbnail_dir {tmp_path / 'thumbs'}" in out
    bad = write(tmp_path, f"[dexis]\nintegrator_dir = {blocker / 'sub'}\n")
    out = subprocess.run(
        [*pms_bridge_command(), "doctor", "--config", str(bad)], capture_output=True, timeout=60, check=False
    ).stdout.decode()
    assert "FAIL PMS profile folders writable:" in out


def test_doctor_reports_a_missing_thumbnail_folder_and_does_not_create_it(tmp_path: Path) -> None:
    """The thumbnail folder is the PMS's share: created by doctor on the unmounted share's mount point,
    it would be an empty local folder that the outbox "delivers" into, marking the pushes done."""
    missing = tmp_path / "share" / "SmartImage"
    config = write(tmp_path, f"[dentrix]\nthumbnails = yes\nthumbnail_dir = {missing}\n")
    out = subprocess.run(
        [*pms_bridge_command(), "doctor", "--config", str(config)],
        capture_output=True,
        timeout=60,
        check=False,
    ).stdout.decode()
    (line,) = [line for line in out.splitlines() if "PMS profile folders" in line]
    assert line.startswith(
        f"FAIL PMS profile folders writable: [dentrix] thumbnail_dir {missing} does not exist: is the share"
        " mounted?"
    ), line
    assert not missing.exists() and not missing.parent.exists()
