"""The pipeline on a Redis with TLS and an ACL user (password from the environment)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest
import redis
import yaml

from tests.support.environment import env_without_plantsight
from tests.support.paths import ROOT
from tests.support.ports import free_port
from tests.support.redis_server import redis_binary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def tls_redis(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([redis_binary(), "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                             "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                             "--save", "", "--dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    admin = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(cert))
    for _ in range(100):
        try:
            admin.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None:
                pytest.skip(f"this redis-server has no TLS support: {proc.stdout.read()[-300:]!r}")
            time.sleep(0.05)
    # An ACL user limited to the line's keys, and no anonymous access.
    admin.acl_setuser("plant-line-a", enabled=True, passwords=["+line-a-secret-0912"], keys=["line-a:*"],
                      commands=["+@all"])
    admin.acl_setuser("default", enabled=False)
    yield port, cert
    proc.terminate()
    proc.wait(10)


def test_pipeline_runs_over_tls_as_an_acl_user(tls_redis, tmp_path, service_ports, request):
    port, cert = tls_redis
    cfg = {"redis": {"url": f"rediss://127.0.0.1:{port}/0", "prefix": "line-a", "username": "plant-line-a",
                     "password_env": "LINE_A_REDIS_PASSWORD", "tls_ca_file": str(cert)},
           "services": service_ports,
           "cameras": [{"id": "k1", "source": "synthetic://thermal", "fps": 10, "tasks": ["thermal"],
                        "max_frames": 5, "on_full": "block"}],
           "models": {"thermal": {"arch": "thermal_cnn"}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**env_without_plantsight(), "LINE_A_REDIS_PASSWORD": "line-a-secret-0912"}
    client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(cert), username="plant-line-a",
                         password="line-a-secret-0912")
    log = tmp_path / "up.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--config", str(path)], cwd=ROOT,
                                env=env, stdout=fh, stderr=subprocess.STDOUT)
        request.addfinalizer(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and client.xlen("line-a:results") < 5:
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    text = log.read_text()
    assert client.xlen("line-a:results") == 5, text[-3000:]
    assert "embedded" not in text and "line-a-secret-0912" not in text
