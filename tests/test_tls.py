"""TLS and mutual TLS over real channels, with a throwaway CA made in the test: a TLS server refuses
plaintext clients and clients that do not trust its CA; a mutual-TLS server also refuses clients without
a certificate from its client CA. The Python client and the ``credscope`` CLI connect with --tls-* files."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import CredScopeClient, CredScopeRpcError
from client.cli import main as cli_main
from tests.helpers import ServerProcess, start_server
from tests.pki import Pki, make_pki
from tests.test_api import applicant

ANONYMOUS = {"CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true", "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "100000"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(model_dir: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """TLS from the settings (environment variables)."""
    sp = start_server(model_dir, cwd=tmp_path_factory.mktemp("tls"), env={
        **ANONYMOUS, "CREDSCOPE_TLS__CERT_FILE": str(pki.server.cert),
        "CREDSCOPE_TLS__KEY_FILE": str(pki.server.key)})
    yield sp
    sp.stop()


@pytest.fixture(scope="module")
def mtls_server(model_dir: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Mutual TLS from the command-line flags."""
    sp = start_server(model_dir, cwd=tmp_path_factory.mktemp("mtls"), env=ANONYMOUS, args=[
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-client-ca", str(pki.ca)])
    yield sp
    sp.stop()


def refused(client: CredScopeClient) -> CredScopeRpcError:
    with pytest.raises(CredScopeRpcError) as e:
        client.score(applicant(), timeout=5)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE, e.value
    return e.value


def test_tls_client_trusting_the_ca_is_served(tls_server: ServerProcess, pki: Pki) -> None:
    with CredScopeClient(tls_server.target, tls_ca=pki.ca, retries=False) as c:
        assert 0 < c.score(applicant()).default_probability < 1
        health = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "TLS (" in tls_server.log()


def test_tls_server_refuses_plaintext_and_untrusting_clients(tls_server: ServerProcess, pki: Pki) -> None:
    with CredScopeClient(tls_server.target, retries=False) as plaintext:
        refused(plaintext)
    with CredScopeClient(tls_server.target, tls=True, retries=False) as system_roots:  # does not know the CA
        refused(system_roots)


def test_mtls_client_with_a_certificate_from_the_ca_is_served(mtls_server: ServerProcess, pki: Pki) -> None:
    with CredScopeClient(mtls_server.target, tls_ca=pki.ca, tls_cert=pki.client.cert, tls_key=pki.client.key,
                         retries=False) as c:
        assert 0 < c.score(applicant()).default_probability < 1
    assert "mutual TLS" in mtls_server.log()


def test_mtls_server_refuses_clients_without_a_trusted_certificate(mtls_server: ServerProcess, pki: Pki) -> None:
    with CredScopeClient(mtls_server.target, tls_ca=pki.ca, retries=False) as no_cert:
        refused(no_cert)
    with CredScopeClient(mtls_server.target, tls_ca=pki.ca, tls_cert=pki.rogue_client.cert,
                         tls_key=pki.rogue_client.key, retries=False) as rogue:
        refused(rogue)
    with CredScopeClient(mtls_server.target, retries=False) as plaintext:
        refused(plaintext)
    # A refused handshake never reaches the server's code; the server goes on serving.
    with CredScopeClient(mtls_server.target, tls_ca=pki.ca, tls_cert=pki.client.cert, tls_key=pki.client.key) as c:
        assert c.model_info().model_version


def test_cli_tls_flags(mtls_server: ServerProcess, tls_server: ServerProcess, pki: Pki,
                       capsys: pytest.CaptureFixture[str]) -> None:
    mtls = ["--target", mtls_server.target, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert),
            "--tls-key", str(pki.client.key)]
    assert cli_main([*mtls, "health"]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert cli_main([*mtls, "score", "--example"]) == 0
    assert "decision" in capsys.readouterr().out
    assert cli_main(["--target", tls_server.target, "--tls-ca", str(pki.ca), "health"]) == 0
    capsys.readouterr()
    # Without the client certificate the mutual-TLS server refuses: the CLI reports it and fails.
    assert cli_main(["--target", mtls_server.target, "--tls-ca", str(pki.ca), "--timeout", "3", "health"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["--target", mtls_server.target, "--tls-cert", str(pki.client.cert), "health"])  # no key


def test_bad_tls_settings_stop_the_server_with_a_clear_message(model_dir: Path, tmp_path: Path, pki: Pki) -> None:
    import subprocess
    import sys

    from tests.helpers import ROOT

    missing = tmp_path / "missing.key"
    cases = [(["--tls-cert", str(pki.server.cert), "--tls-key", str(missing)], "cannot read the TLS key"),
             (["--tls-cert", str(pki.server.cert)], "tls.cert_file and tls.key_file go together")]
    for args, message in cases:
        done = subprocess.run([sys.executable, "-m", "server.main", "--port", "0", "--model-dir", str(model_dir),
                               *args], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
        assert done.returncode != 0
        assert message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
