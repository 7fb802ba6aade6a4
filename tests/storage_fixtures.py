"""Fixtures for object storage: the devcloud with storage resources (``--storage``: its own S3 server process,
moto with IAM auth on) and a fresh storage resource with an object store on it. Loaded by conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from support import DevCloud

if TYPE_CHECKING:  # imported in the fixtures: every test module loads this file, few use storage
    from agent.archive.objectstore import ObjectStore
    from agent.cloud._storage import StorageClient, StorageResource


@pytest.fixture(scope="module")
def storage_devcloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCloud]:
    """The devcloud with storage, one per test module (its S3 server takes seconds to start): tests keep apart
    by each using storage resources of their own. Not one per run: a process left running between modules is
    in the way of tests that signal every child of the test process (tests/test_executor_signals.py).
    ``storage_devcloud.settings()`` are the agent's cloud settings for it, ``storage_devcloud.agent_env()`` its
    environment; knobs changed by a test (e.g. ``credentials_ttl_s``) are reset after each test by the
    ``storage_client`` fixture."""
    server = DevCloud(tmp_path_factory.mktemp("storage-devcloud") / "devcloud.log", "--storage", workers=1)
    yield server
    server.stop()


@pytest.fixture
def storage_client(storage_devcloud: DevCloud) -> Iterator[StorageClient]:
    from agent.cloud._storage import StorageClient

    client = StorageClient(storage_devcloud.settings())
    yield client
    client.close()
    storage_devcloud.reset()  # knobs back to the start-up values for the next test


@pytest.fixture
def storage(storage_client: StorageClient) -> Iterator[StorageResource]:
    """A fresh storage resource (1 GB), released (objects and all) after the test."""
    resource = storage_client.request(1)
    yield resource
    storage_client.release(resource.id)


@pytest.fixture
def object_store(storage: StorageResource) -> ObjectStore:
    """An object store on the ``storage`` resource; multipart above 6 MiB (parts of 5 MiB, S3's least)."""
    from agent.archive.objectstore import ObjectStore

    return ObjectStore(storage.location, multipart_threshold=6 * 1024 * 1024, part_size=5 * 1024 * 1024)
