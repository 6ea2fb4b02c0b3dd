"""Config: defaults, environment overrides, one-line errors naming file/section/key/value/allowed, init."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import CODE_PAGES, ConfigError, load_settings
from bridge.install import init_home


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pms-bridge.ini"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_loopback_sqlite_and_the_dtx_settings(tmp_path: Path) -> None:
    settings = load_settings(str(write(tmp_path, "[api]\ntoken = x\n")))
    assert settings.api.host == "127.0.0.1"
    assert settings.api.port == 4429
    assert settings.opp_web.port == 4435
    assert settings.opp_web.host == "127.0.0.1"
    assert settings.store.url == f"sqlite:///{tmp_path.as_posix()}/bridge.db"
    assert settings.store.images == tmp_path / "images"
    pms = settings.pms
    assert (pms.ignore_practice_id, pms.update_patient_info, pms.allow_patient_creation) == (
        False,
        True,
        True,
    )
    assert (pms.single_patient_mode, pms.open_patient_in, pms.open_image_as) == (False, "home", "preview")
    assert settings.vdds.encoding == "auto"
    assert settings.thumbnails.size == 256


def test_relative_paths_start_at_the_config_folder(tmp_path: Path) -> None:
    settings = load_settings(str(write(tmp_path, "[store]\nurl = sqlite:///data/b.db\nimages = pics\n")))
    assert settings.store.url == f"sqlite:///{tmp_path.as_posix()}/data/b.db"
    assert settings.store.images == tmp_path / "pics"


@pytest.mark.parametrize(
    "setting",
    ["", "tls_cert = tls/own.pem", "tls_cert = ~/own.pem", "tls_cert = $PMS_CERTS/own.pem", "tls_cert ="],
)
def test_the_launch_client_trusts_the_certificate_file_the_daemon_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """One path rule: the launch client's cheap reader (`api_endpoint`) finds `[api] tls_cert` where the
    typed settings do, by default and with a relative, `~` or environment-variable path."""
    from bridge.config_file import api_endpoint, config_home, read_raw

    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("PMS_CERTS", str(tmp_path / "certs"))
    monkeypatch.chdir(tmp_path)  # another folder than the config's
    (tmp_path / "conf").mkdir()
    path = str(write(tmp_path / "conf", f"[api]\ntoken = x\ntls = yes\n{setting}\n"))
    served = load_settings(path).api.tls_cert
    trusted = api_endpoint(read_raw(path), config_home(path))[4]
    assert (Path(trusted) if trusted else None) == served
    if not setting:
        assert served == tmp_path / "conf" / "tls" / "cert.pem"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PMS_BRIDGE__PMS__IGNORE_PRACTICE_ID", "yes")
    monkeypatch.setenv("PMS_BRIDGE__API__PORT", "5000")
    settings = load_settings(str(write(tmp_path, "[pms]\nignore_practice_id = no\n")))
    assert settings.pms.ignore_practice_id is True
    assert settings.api.port == 5000


def test_bad_value_names_file_section_key_value_and_what_is_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "[pms]\nopen_patient_in = kitchen\n")
    with pytest.raises(ConfigError) as err:
        load_settings(str(path))
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert "[pms] open_patient_in = 'kitchen'" in message
    assert "allowed: home | clinic" in message


def test_bad_value_from_the_environment_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PMS_BRIDGE__API__PORT", "99999")
    with pytest.raises(
        ConfigError, match=r"\[api\] port = '99999' \(from environment PMS_BRIDGE__API__PORT\)"
    ):
        load_settings(str(write(tmp_path, "")))


def test_every_encoding_setting_takes_the_same_code_pages(tmp_path: Path) -> None:
    """One list (CODE_PAGES) for [opp], [vdds] and the launch profiles; [vdds] adds auto."""
    sections = ("opp", "vdds", "dexis", "dentrix", "eaglesoft", "cliniview")
    for page in CODE_PAGES:
        text = "".join(f"[{section}]\nencoding = {page}\n" for section in sections)
        settings = load_settings(str(write(tmp_path, text)))
        assert [getattr(settings, section).encoding for section in sections] == [page] * len(sections)
    with pytest.raises(ConfigError, match=r"allowed: cp1252 \| cp850 \| cp437 \| iso-8859-15 \| utf-8"):
        load_settings(str(write(tmp_path, "[opp]\nencoding = auto\n")))


def test_unknown_key_and_section_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"\[pms\] unknown key 'ignore_practice' \(known keys: ignore_practice_id"
    ):
        load_settings(str(write(tmp_path, "[pms]\nignore_practice = yes\n")))
    with pytest.raises(ConfigError, match=r"unknown section \[pmss\]"):
        load_settings(str(write(tmp_path, "[pmss]\nx = 1\n")))


def test_missing_and_broken_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(str(tmp_path / "nope.ini"))
    with pytest.raises(ConfigError, match="not a valid INI file"):
        load_settings(str(write(tmp_path, "no section header\n")))


def test_init_writes_a_working_home_and_is_idempotent(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings, done = init_home(home)
    config = home / "pms-bridge.ini"
    assert config.exists() and settings.path == config
    assert len(settings.api.token) >= 32
    assert settings.api.tls_cert is not None and settings.api.tls_cert.exists()
    assert (home / "bridge.db").exists()
    assert any("created the store" in line for line in done)
    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file() and p.suffix in (".ini", ".pem")}
    settings2, done2 = init_home(home)
    assert done2 == []
    assert settings2.api.token == settings.api.token
    assert {p: p.read_bytes() for p in before} == before
    # the written file documents every key it sets
    text = config.read_text(encoding="utf-8")
    assert "; allowed: yes or no" in text and "open_patient_in = home" in text


def test_init_creates_the_watched_folders_in_its_home_and_names_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watched folder in the bridge's home is ours to make; one elsewhere is the PMS's share, which a
    folder made on its mount point would hide (the daemon never makes either)."""
    home = tmp_path / "home"
    share = tmp_path / "mnt" / "integrator"
    monkeypatch.setenv("PMS_BRIDGE__VDDS__EXCHANGE_DIR", str(home / "exchange"))
    monkeypatch.setenv("PMS_BRIDGE__DENTRIX__INTEGRATOR_DIR", str(share))
    _settings, done = init_home(home)
    assert (home / "exchange").is_dir()
    assert f"created the watched folder [vdds] exchange_dir {home / 'exchange'}" in done
    assert not share.parent.exists()
    assert (
        f"not created: [dentrix] integrator_dir {share} does not exist; it is outside {home}, so it is the"
        " PMS's share: mount it or create it (the daemon watches it once it appears)"
    ) in done
    _settings, again = init_home(home)
    assert [line for line in again if "exchange_dir" in line] == []


def test_an_exchange_dir_of_a_disabled_vdds_is_not_created_checked_nor_watched(tmp_path: Path) -> None:
    """With `[vdds] enabled = no` the daemon answers no VDDS request: its `exchange_dir` is left as it is
    by init, doctor and the daemon (one list of watched folders, bridge.config.watched_folders)."""
    import json
    import os
    import subprocess

    from tests.conftest import pms_bridge_command, start_daemon
    from tests.support.ports import free_port

    home = tmp_path / "home"
    exchange = home / "exchange"
    env = {"PMS_BRIDGE__VDDS__ENABLED": "no", "PMS_BRIDGE__VDDS__EXCHANGE_DIR": str(exchange)}
    init = subprocess.run(
        [*pms_bridge_command(), "init", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert init.returncode == 0, init.stderr
    assert not exchange.exists() and "[vdds] exchange_dir" not in init.stdout
    config = home / "pms-bridge.ini"  # the same settings in the file, for doctor and the daemon
    head, vdds = config.read_text(encoding="utf-8").split("\n[vdds]\n")
    vdds = vdds.replace("enabled = yes", "enabled = no", 1).replace(
        "exchange_dir = \n", f"exchange_dir = {exchange}\n"
    )
    head = head.replace("port = 4429", f"port = {free_port()}").replace(
        "port = 4435", f"port = {free_port()}"
    )
    config.write_text(f"{head}\n[vdds]\n{vdds}", encoding="utf-8")
    settings = load_settings(str(config))
    assert (settings.vdds.enabled, settings.vdds.exchange_dir) == (False, exchange)
    doctor = subprocess.run(
        [*pms_bridge_command(), "doctor", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert "ok   VDDS exchange folder writable: not configured" in doctor.stdout.splitlines(), doctor.stdout
    daemon = start_daemon(config)
    try:
        status, body = daemon.request("GET", "/readyz", token=None)
        assert status == 200, body
        assert "watch:vdds" not in json.loads(body)["checks"]
    finally:
        assert daemon.stop() == 0
    assert not exchange.exists()


def test_a_hash_in_a_value_is_kept_and_a_semicolon_after_a_space_still_ends_it(tmp_path: Path) -> None:
    """'#' is a comment only at the start of a line: "Praxis #2" is a folder name, not a comment."""
    config = write(
        tmp_path,
        "# a comment line\n[store]\nimages = /tmp/x/Praxis #2/images\n"
        "[thumbnails]\nwatermark = Praxis #1 ; note\n[api]\nport = 4500            ; REST API\n",
    )
    settings = load_settings(str(config))
    assert settings.store.images == Path("/tmp/x/Praxis #2/images")
    assert settings.thumbnails.watermark == "Praxis #1"
    assert settings.api.port == 4500


def test_init_into_a_home_with_a_hash_and_umlauts_serves_from_it(tmp_path: Path) -> None:
    import json
    import subprocess

    from tests.conftest import pms_bridge_command, start_daemon
    from tests.support.ports import free_port

    home = tmp_path / "Praxis Müller & Söhne #2"
    init = subprocess.run(
        [*pms_bridge_command(), "init", "--home", str(home)], capture_output=True, text=True, timeout=120
    )
    assert init.returncode == 0, init.stderr
    config = home / "pms-bridge.ini"
    # the command it prints, pasted into a shell, names this config (unquoted, `#2...` was a comment)
    [command] = [line for line in init.stdout.splitlines() if line.startswith("start the daemon with: ")]
    words = command.removeprefix("start the daemon with: pms-bridge ")
    pasted = subprocess.run(
        ["sh", "-c", f"printf '%s\\n' {words}"], capture_output=True, text=True, timeout=60, check=True
    )
    assert pasted.stdout.splitlines() == ["serve", "--config", str(config)]
    settings = load_settings(str(config))
    assert settings.store.images == home / "images" and settings.store.images.is_dir()
    assert settings.store.url == f"sqlite:///{home.as_posix()}/bridge.db"
    assert settings.api.tls_cert == home / "tls" / "cert.pem" and settings.api.tls_cert.exists()
    text = config.read_text(encoding="utf-8")
    config.write_text(
        text.replace("port = 4429", f"port = {free_port()}").replace("port = 4435", f"port = {free_port()}"),
        encoding="utf-8",
    )
    daemon = start_daemon(config)
    try:
        status, body = daemon.request("GET", "/readyz", token=None)
        assert status == 200, body
        assert json.loads(body)["checks"]["images"]["path"] == str(home / "images")
    finally:
        assert daemon.stop() == 0


def test_the_readme_home_with_its_token_is_kept_out_of_git() -> None:
    """README's first command makes `./data` the home; its pms-bridge.ini holds the API token, so git
    must not offer it for a commit."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    assert "pms-bridge init --home ./data" in (root / "README.md").read_text(encoding="utf-8")
    ignored = subprocess.run(["git", "check-ignore", "--quiet", "data/pms-bridge.ini"], cwd=root, timeout=60)
    assert ignored.returncode == 0


def test_init_refuses_a_home_a_semicolon_comment_would_cut(tmp_path: Path) -> None:
    import subprocess

    from tests.conftest import pms_bridge_command

    home = tmp_path / "Praxis ;2"
    result = subprocess.run(
        [*pms_bridge_command(), "init", "--home", str(home)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "choose a folder without it" in result.stderr
    assert not home.exists()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_a_config_saved_as_unicode_by_notepad_is_read(tmp_path: Path, encoding: str) -> None:
    """Notepad's "Unicode" is UTF-16 with a byte order mark (little-endian; "Unicode big endian" too)."""
    text = "[thumbnails]\nwatermark = Zahnarztpraxis Müller ; note\n[api]\nport = 4501\n"
    bom = {"utf-16": b"", "utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}[encoding]
    config = tmp_path / "pms-bridge.ini"
    config.write_bytes(bom + text.encode(encoding))
    settings = load_settings(str(config))
    assert settings.thumbnails.watermark == "Zahnarztpraxis Müller" and settings.api.port == 4501


def test_a_config_in_cp1252_is_refused_naming_the_line_and_the_remedy(tmp_path: Path) -> None:
    config = tmp_path / "pms-bridge.ini"
    config.write_bytes("[api]\nport = 4501\n[thumbnails]\nwatermark = Praxis Müller\n".encode("cp1252"))
    with pytest.raises(ConfigError) as caught:
        load_settings(str(config))
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        f"{config}: line 4 is not UTF-8 text (byte 0xfc, perhaps Windows-1252):"
        " save the file as UTF-8 (Notepad: File, Save as, Encoding UTF-8)"
    )


def test_only_loopback_listen_addresses_count_as_closed_to_the_network() -> None:
    from bridge.config import is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", " LocalHost "):
        assert is_loopback(host), host
    listen_all = ("0.0.0.0", "::", "*")  # noqa: S104 - addresses under test, nothing is bound
    for host in (*listen_all, "192.168.1.5", "fe80::1", "pms-server", "localhost.example.com"):
        assert not is_loopback(host), host
