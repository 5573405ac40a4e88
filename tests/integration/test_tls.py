"""TLS and mutual TLS between services, configured through SecuritySettings."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from pydantic import SecretStr
from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc

from clients.sdk import Client, PlaintextTokenError, Tls
from services.common.server import connect
from services.common.settings import MetricsSettings, PipelineSettings, SecuritySettings, StorageSettings
from services.common.tokens import Role, write_tokens_file
from services.metrics_svc import app as metrics_app
from services.pipeline_svc import app as pipeline_app
from tests.helpers import NODE_KEY

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and two certificates it signed (server: 127.0.0.1/localhost; a client)."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=segtrain-test-ca", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)
    return d


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(pki: Path, tmp_path: Path) -> None:
    server_security = SecuritySettings(tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key",
                                       tls_ca_file=pki / "ca.pem", tls_client_auth=True)
    server, port, _, _ = metrics_app.build(
        MetricsSettings(listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path / 'm.db'}"), server_security)
    server.start()
    request = metrics_pb2.ListJobEventsRequest(job="jobs/j-1")
    try:
        client = SecuritySettings(tls_cert_file=pki / "client.pem", tls_key_file=pki / "client.key",
                                  tls_ca_file=pki / "ca.pem")
        with connect(f"127.0.0.1:{port}", client) as channel:
            assert metrics_pb2_grpc.MetricsServiceStub(channel).ListJobEvents(request, timeout=10).last_seq == 0
        without_certificate = SecuritySettings(tls_ca_file=pki / "ca.pem")
        plaintext = SecuritySettings()
        for security in (without_certificate, plaintext):
            with connect(f"127.0.0.1:{port}", security) as channel, pytest.raises(grpc.RpcError) as info:
                metrics_pb2_grpc.MetricsServiceStub(channel).ListJobEvents(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0).wait()


def test_the_sdk_speaks_tls_and_mutual_tls_and_keeps_tokens_off_plaintext(
        pki: Path, tmp_path: Path, s3_settings: StorageSettings) -> None:
    tokens = tmp_path / "tokens.json"
    write_tokens_file(tokens, {"viewer-token": ("v", Role.VIEWER)})
    security = SecuritySettings(tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key",
                                tls_ca_file=pki / "ca.pem", tls_client_auth=True, auth_tokens_file=tokens,
                                node_key=SecretStr(NODE_KEY))
    settings = PipelineSettings(listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path / 'p.db'}",
                                metrics_address="127.0.0.1:1")
    server, port, _, _ = pipeline_app.build(settings, s3_settings, security)
    server.start()
    try:
        mutual = Tls(ca_file=pki / "ca.pem", cert_file=pki / "client.pem", key_file=pki / "client.key")
        with Client(f"127.0.0.1:{port}", token="viewer-token", tls=mutual) as client:
            assert client.list_architectures()  # answered over mutual TLS, with the token
        with Client(f"127.0.0.1:{port}", token="viewer-token", tls=Tls(ca_file=pki / "ca.pem")) as client, \
                pytest.raises(grpc.RpcError) as info:  # no client certificate: the handshake fails
            client.list_architectures()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0).wait()
    # A token never leaves the machine in plaintext unless told to.
    with pytest.raises(PlaintextTokenError, match=r"refusing to send a token in plaintext to 10\.1\.2\.3:50051"):
        Client("10.1.2.3:50051", token="t", tls=None, allow_plaintext=False)
    Client("10.1.2.3:50051", token="t", allow_plaintext=True).close()  # a private network, said so
    Client("127.0.0.1:50051", token="t", allow_plaintext=False).close()  # loopback
