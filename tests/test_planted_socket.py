"""A socket another local user planted where the SDK and the CLI look for the daemon:
refused before anything (a token, a prompt) is sent."""

from __future__ import annotations

import os

import pytest
from live_daemon import OTHER_UID, nothing_connected, planted_socket

from mtpd.cli import main
from mtpd.client import Client, UntrustedSocket


@pytest.fixture
def planted(tmp_path):
    if os.geteuid() != 0:  # only root can make a file another user's
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs the tests as root: a socket of another user needs it")
        pytest.skip("needs root to plant a socket of another user")
    with planted_socket(tmp_path / "run") as (path, listener):
        yield path, listener


def test_a_socket_of_another_user_is_refused_by_the_sdk_and_the_cli(planted, capsys, monkeypatch):
    path, listener = planted
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(UntrustedSocket, match=f"belongs to uid {OTHER_UID}"):
        Client(str(path), token="secret")
    monkeypatch.setenv("MTPD_API_TOKEN", "secret")
    assert main(["generate", "--address", str(path), "Hello"]) == 1
    monkeypatch.delenv("MTPD_API_TOKEN")
    assert f"belongs to uid {OTHER_UID}" in capsys.readouterr().err
    assert nothing_connected(listener)
    monkeypatch.setenv("MTPD_TRUSTED_SOCKET_OWNERS", f"nosuchuser, {OTHER_UID}")
    Client(str(path)).close()  # trusted by name: no refusal


def test_a_directory_of_another_user_or_open_to_all_is_refused(planted):
    path, listener = planted
    os.chown(path.parent, OTHER_UID, OTHER_UID)
    with pytest.raises(UntrustedSocket, match="its directory belongs to uid"):
        Client(str(path))
    os.chown(path.parent, 0, 0)
    path.parent.chmod(0o777)
    with pytest.raises(UntrustedSocket, match="writable by all"):
        Client(str(path))
    path.parent.chmod(0o1777)  # sticky, as /tmp: others cannot replace the socket
    Client(str(path)).close()
    link = path.parent.parent / "link.sock"
    link.symlink_to(path)
    os.lchown(link, OTHER_UID, OTHER_UID)
    with pytest.raises(UntrustedSocket, match="the socket belongs to uid"):
        Client(str(link))
    assert nothing_connected(listener)
