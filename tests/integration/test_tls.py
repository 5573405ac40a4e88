"""TLS and mutual TLS between services, configured through SecuritySettings."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc

from services.common.server import connect
from services.common.settings import MetricsSettings, SecuritySettings
from services.metrics_svc import app as metrics_app

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
