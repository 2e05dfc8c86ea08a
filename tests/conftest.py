import os

import pytest

# Keep every cache a test writes inside the pytest temp area, and Ray on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    return os.environ.get("OPENRLAIF_TEST_CACHE") or str(tmp_path_factory.mktemp("openrlaif-cache"))


@pytest.fixture(scope="session")
def tiny_model(model_cache) -> str:
    """A 2-layer random Llama (hidden 128) with a locally trained BPE tokenizer and a ChatML template."""
    from openrlaif.models import resolve_model_path
    return resolve_model_path("tiny-random-llama", model_cache)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the integration tests; only it is stopped at the end (never `ray stop`)."""
    import ray

    from openrlaif.runtime import init_local_ray
    if ray.is_initialized():
        yield
        return
    init_local_ray(num_cpus=6)
    yield
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
        if f"{os.sep}e2e{os.sep}" in path:
            item.add_marker(pytest.mark.e2e)
