"""Bearer tokens with read/write scopes, the start-up policy, and TLS."""

import datetime
import os
import ssl
import subprocess
import sys

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from api.app import create_app
from api.auth import check_policy
from paramstore import AuthError, Client
from store.config import config_from_mapping, render_toml
from store.errors import ConfigError
from tests.helpers.apps import raw_config
from tests.waiting import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def authed(tmp_path_factory):
    cfg = config_from_mapping(
        raw_config(
            tmp_path_factory.mktemp("auth"), auth={"read_tokens": ["reader-tok"], "write_tokens": ["writer-tok"]}
        )
    )
    with TestClient(create_app(cfg)) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "replica ready")
        yield c


def put(c, token=None):
    headers = {"Content-Type": "application/octet-stream", "X-Dtype": "float32", "X-Shape": "2"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return c.put("/v1/tensors/w", content=np.zeros(2, np.float32).tobytes(), headers=headers)


def test_tokens_and_scopes(authed):
    r = put(authed)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert put(authed, "wrong").status_code == 401
    r = put(authed, "reader-tok")
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert put(authed, "writer-tok").status_code in (200, 201)
    assert authed.get("/v1/tensors/w").status_code == 401
    assert authed.get("/v1/tensors/w", headers={"Authorization": "Bearer reader-tok"}).status_code == 200
    assert authed.get("/v1/tensors/w", headers={"Authorization": "Bearer writer-tok"}).status_code == 200
    assert authed.get("/healthz").status_code == 200 and authed.get("/readyz").status_code == 200


def test_start_up_policy(tmp_path):
    with pytest.raises(ConfigError, match=r"auth\.write_tokens"):
        check_policy(config_from_mapping(raw_config(tmp_path)))
    check_policy(config_from_mapping(raw_config(tmp_path, auth={"insecure_no_auth": True})))
    off_loopback = raw_config(tmp_path, auth={"insecure_no_auth": True})
    off_loopback["nodes"][0]["http"] = "10.1.2.3:8700"
    with pytest.raises(ConfigError, match="insecure_no_auth"):
        check_policy(config_from_mapping(off_loopback))


def _throwaway_ca(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "paramstore test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(pem))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "ca.pem"


@pytest.mark.cluster
def test_tls_and_tokens_on_a_real_replica(tmp_path):
    ca = _throwaway_ca(tmp_path)
    raw = raw_config(tmp_path, tls={"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "key.pem")})
    cfg = config_from_mapping(raw)
    (tmp_path / "c.toml").write_text(render_toml(cfg))
    env = dict(os.environ, PYTHONPATH=ROOT, PARAMSTORE_WRITE_TOKENS="w-token", PARAMSTORE_READ_TOKENS="r-token")
    with open(tmp_path / "n1.log", "wb") as log:  # the replica writes to its own copy
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "api.cli",
                "serve",
                "--config",
                str(tmp_path / "c.toml"),
                "--node",
                "n1",
                "--data-dir",
                str(tmp_path / "data"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"https://{cfg.node.http}"
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=2) as https:
            wait_until(lambda: https.get(url + "/readyz").status_code == 200, 30, "TLS replica ready")
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://{cfg.node.http}/healthz", timeout=2)
        with pytest.raises(httpx.HTTPError):  # an unknown CA is refused
            httpx.get(url + "/healthz", timeout=2)
        with Client([url], token="w-token", verify=str(ca), deadline=10) as ps:
            assert ps.create("t", np.ones(3, np.float32)) == 1
            assert ps.pull("t")[1] == 1
        with Client([url], token="r-token", verify=str(ca), deadline=10) as ps:
            assert ps.pull("t")[0].tolist() == [1, 1, 1]
            with pytest.raises(AuthError):
                ps.push_grad("t", np.ones(3, np.float32))
    finally:
        proc.terminate()
        proc.wait(20)
