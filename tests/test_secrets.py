"""Credentials never land in a run's files or output.

A unique secret goes in through ``--data.storage_options`` (a data module that keeps its
arguments as hyperparameters, as many do) and through a docs-style module's own
``api_token`` option; the run trains, is killed after a checkpoint, resumes, and is
tested. The secret is in no file of the run (checkpoints read as bytes), in no object of
the bucket's run folder when the run directory is in object storage, and in no line the
processes printed; the run still used the real values (the module's live token is checked
by what it trained on: the fit ran with it, and the masked files say ``***``).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from cluster import object_store
from conftest import free_port, kill_after_checkpoint, run, train_cmd, write_shards

SECRET_MODULES = [
    "--model", "plain_lightning.TokenModule", "--data", "shard_data.HparamsShardData",
]  # fmt: skip


def secret_args(token: str, key: str) -> list[str]:
    options = {"aws_access_key_id": "id-of-the-test", "aws_secret_access_key": key}
    return [
        *SECRET_MODULES,
        "--model.api_token", token,
        "--data.storage_options", json.dumps(options),
        "--data.batch_size", "16",
        "--trainer.max_epochs", "2",
        "--checkpoint.every_n_train_steps", "5",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("secret-shards"), 160, num_val=32, num_test=32)


@pytest.mark.slow  # a fit, a resume and every command with secrets set: 28 s
def test_secrets_are_in_no_file_and_no_output_of_a_local_run(tmp_path, shards):
    token, key = f"tok-{uuid.uuid4().hex}", f"key-{uuid.uuid4().hex}"
    run_dir = tmp_path / "run"
    args = secret_args(token, key)
    fit = train_cmd("fit", run_dir, shards, *args)
    killed_at = kill_after_checkpoint(fit, run_dir, 5)
    assert 5 <= killed_at < 20
    outputs = [
        run(fit + ["--ckpt_path", "auto"]),
        run(train_cmd("test", run_dir, shards, *args, "--ckpt_path", "last")),
        run(fit + ["--print_config"]),  # the config as the user asked to see it
    ]
    assert "test_loss" in outputs[1].stdout  # the test ran on the resumed weights
    assert "api_token: ***" in outputs[2].stdout  # masked as it was printed
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 20
    # Masked, not dropped: the files still say which options were given.
    assert last["hyper_parameters"]["api_token"] == "***"
    assert last["datamodule_hyper_parameters"]["storage_options"] == {
        "aws_access_key_id": "***", "aws_secret_access_key": "***"
    }  # fmt: skip
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    names = {path.name for path in files}
    assert {"config.yaml", "hparams.yaml", "last.ckpt", "plan.json", "metrics.csv"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names)
    for path in files:
        data = path.read_bytes()
        assert token.encode() not in data and key.encode() not in data, path
    for output in outputs:
        assert token not in output.stdout + output.stderr
        assert key not in output.stdout + output.stderr


@pytest.mark.s3
@pytest.mark.slow  # a store, a kill and a resume
def test_secrets_are_in_no_object_of_a_run_in_object_storage(tmp_path, shards):
    token, key = f"tok-{uuid.uuid4().hex}", f"key-{uuid.uuid4().hex}"
    (tmp_path / "s3").mkdir()
    with object_store(tmp_path / "s3", [free_port() for _ in range(10)]) as store:
        runs = f"s3://{store.bucket('template-runs')}/secret"
        args = secret_args(token, key)
        outputs = [
            run(train_cmd("fit", runs, shards, *args), env=store.env),
            run(train_cmd("fit", runs, shards, *args, "--ckpt_path", "auto"), env=store.env),
        ]
        assert "resumed at global step 20 of 20" in outputs[1].stdout + outputs[1].stderr
        client = store.client()
        listed = client.list_objects_v2(Bucket="template-runs", Prefix="secret/")["Contents"]
        keys = [entry["Key"] for entry in listed]
        assert any(k.endswith("/config.yaml") for k in keys) and any(
            k.endswith(".ckpt") for k in keys
        )
        for name in keys:
            data = client.get_object(Bucket="template-runs", Key=name)["Body"].read()
            assert token.encode() not in data and key.encode() not in data, name
    for output in outputs:
        assert token not in output.stdout + output.stderr
        assert key not in output.stdout + output.stderr


def test_a_weights_only_checkpoint_keeps_no_secret_either(tmp_path, shards):
    """Lightning skips the callbacks' checkpoint hook for weights-only saves, which still
    hold the hyperparameters: the template masks every checkpoint it builds."""
    from plain_lightning import TokenModule
    from shard_data import ShardData

    from train_template import PlannedTrainer, template_callbacks

    token = f"tok-{uuid.uuid4().hex}"
    trainer = PlannedTrainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=template_callbacks(),
    )
    module = TokenModule(api_token=token)
    trainer.fit(module, ShardData(str(shards), batch_size=16))
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    assert token.encode() not in (tmp_path / "weights.ckpt").read_bytes()
    saved = torch.load(tmp_path / "weights.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["api_token"] == "***" and "optimizer_states" not in saved
    assert module.hparams.api_token == token  # the run keeps the real value
