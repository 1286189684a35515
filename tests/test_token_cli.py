"""``kizuna-stream token``: a token the server verifies, its secret never on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.cli.main import main
from shared.auth.secret_file import SECRET_ENV, default_secret_path, ensure_secret_file, load_secret
from shared.auth.tokens import TokenKey, TokenVerifier
from shared.errors import AuthError, AuthReason
from shared.models import QualityPreset, ViewerPermissions

ENV_SECRET = "env-secret-for-the-cli-tests-0123456789"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME with no secret anywhere, and no secret in the environment."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv(SECRET_ENV, raising=False)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["token", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def verifier(secret: bytes) -> TokenVerifier:
    return TokenVerifier(TokenKey.hs256(secret))


def test_prints_a_token_the_server_accepts_with_the_permissions_asked(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(SECRET_ENV, ENV_SECRET)
    before = time.time()
    code, out, err = run(
        capsys,
        "--stream",
        "cam",
        "--viewer",
        "alice",
        "--can-record",
        "--can-control-quality",
        "--max-quality",
        "medium",
        "--ttl",
        "120",
    )
    assert (code, err) == (0, "")
    token = out.strip()
    assert out == token + "\n"  # the token alone, so $(kizuna-stream token ...) works
    grant = verifier(ENV_SECRET.encode()).verify(token, stream="cam", now=time.time())
    assert grant.viewer == "alice"
    assert grant.permissions == ViewerPermissions(
        can_record=True, can_control_quality=True, max_quality=QualityPreset.MEDIUM
    )
    assert grant.expires_at is not None
    assert before + 120 <= grant.expires_at <= time.time() + 121
    with pytest.raises(AuthError) as caught:
        verifier(ENV_SECRET.encode()).verify(token, stream="cam", now=grant.expires_at)
    assert caught.value.reason is AuthReason.EXPIRED


def test_defaults_view_only_for_an_hour(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(SECRET_ENV, ENV_SECRET)
    code, out, _ = run(capsys, "--stream", "cam")
    assert code == 0
    now = time.time()
    grant = verifier(ENV_SECRET.encode()).verify(out.strip(), stream="cam", now=now)
    assert grant.viewer is None and grant.permissions == ViewerPermissions()
    assert grant.expires_at is not None and 3590 <= grant.expires_at - now <= 3601


def test_json_output(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(SECRET_ENV, ENV_SECRET)
    code, out, _ = run(capsys, "--stream", "cam", "--viewer", "bob", "--json")
    assert code == 0
    report = json.loads(out)
    grant = verifier(ENV_SECRET.encode()).verify(report["token"], stream="cam", now=time.time())
    assert report["stream"] == "cam" and report["viewer"] == "bob"
    assert report["token_id"] == grant.token_id
    assert report["expires_at"] == grant.expires_at
    assert report["permissions"] == {
        "can_view": True,
        "can_record": False,
        "can_control_quality": False,
        "max_quality": "ultra",
    }


def test_reads_the_secret_file_a_server_on_this_machine_created(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ensure_secret_file(default_secret_path())  # what `serve` does on its first start
    code, out, _ = run(capsys, "--stream", "cam")
    assert code == 0
    server_secret = load_secret(create=True)
    assert verifier(server_secret).verify(out.strip(), stream="cam", now=time.time())


def test_secret_file_flag_wins_over_the_environment(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(SECRET_ENV, ENV_SECRET)
    path = home / "my-secret"
    path.write_text("file-secret-for-the-cli-tests-0123456789\n")
    path.chmod(0o600)
    code, out, _ = run(capsys, "--stream", "cam", "--secret-file", str(path))
    assert code == 0
    verifier(b"file-secret-for-the-cli-tests-0123456789").verify(
        out.strip(), stream="cam", now=time.time()
    )
    with pytest.raises(AuthError) as caught:
        verifier(ENV_SECRET.encode()).verify(out.strip(), stream="cam", now=time.time())
    assert caught.value.reason is AuthReason.FORGED


def test_no_secret_anywhere_says_how_to_get_one(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "--stream", "cam")
    assert code == 1 and out == ""
    assert SECRET_ENV in err and "--secret-file" in err and "kizuna-stream serve" in err
    assert not default_secret_path().exists()  # `token` never creates the server's secret


def test_a_secret_file_open_to_others_is_refused(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = home / "open-secret"
    path.write_text("open-secret-for-the-cli-tests-0123456789\n")
    path.chmod(0o644)
    code, out, err = run(capsys, "--stream", "cam", "--secret-file", str(path), "--json")
    assert code == 1
    assert json.loads(out)["error"]["kind"] == "ConfigError"
    assert "chmod 600" in err and "open-secret-for" not in err + out


def test_the_secret_cannot_be_given_on_the_command_line(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["token", "--stream", "cam", "--secret", ENV_SECRET])
    assert caught.value.code == 2
    # Refused as unknown, not taken for an abbreviation of --secret-file (read as a path).
    assert "unrecognized arguments: --secret" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--stream", "cam", "--ttl", "0"],
        ["--stream", "cam", "--ttl", "-5"],
        ["--stream", "cam", "--ttl", "1e9"],
        ["--stream", "two words"],
        ["--stream", "cam", "--viewer", "x" * 65],
    ],
)
def test_bad_arguments_are_usage_errors(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    monkeypatch.setenv(SECRET_ENV, ENV_SECRET)
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.startswith("kizuna-stream: error: ")


def test_custom_is_not_a_max_quality(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["token", "--stream", "cam", "--max-quality", "custom"])
    assert caught.value.code == 2


def test_the_installed_command_runs(tmp_path: Path) -> None:
    env = {
        **os.environ,
        SECRET_ENV: ENV_SECRET,
        "HOME": str(tmp_path),
        "XDG_STATE_HOME": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-m", "actors.cli", "token", "--stream", "cam"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    verifier(ENV_SECRET.encode()).verify(result.stdout.strip(), stream="cam", now=time.time())
    assert ENV_SECRET not in result.stdout + result.stderr
