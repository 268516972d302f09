"""The language-model example on the machinery, with nothing special-cased for it:
token shards hold every train byte once (up to the documented per-chunk tail), the split
is by whole file, preparation is idempotent; a token budget plans exactly the steps
executed and the LR ends on the last step (world size 1 and 2, drop_last and
accumulation); SIGKILL after a mid-epoch checkpoint resumes bitwise; torchrun runs
``configs/lm.yaml``; predict writes readable continuations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import (
    CPU_DDP,
    PYTHON,
    REPO,
    assert_same_weights,
    free_port,
    kill_after_checkpoint,
    load_plan,
    run,
    train_cmd,
)

from examples.lm.prepare import SEPARATOR, packing_order, prepare, source_files

CONTEXT = 16
PIECE = 64  # bytes per piece in the fixture's preparation (files are 60-330 bytes)
TINY = [
    "--model.init_args.network.init_args.context",
    str(CONTEXT),
    "--model.init_args.network.init_args.width",
    "32",
    "--model.init_args.network.init_args.layers",
    "1",
    "--model.init_args.network.init_args.heads",
    "2",
    "--model.init_args.network.init_args.dropout",
    "0.1",
    "--data.context",
    str(CONTEXT),
    "--data.batch_size",
    "8",
    "--trainer.val_check_interval",
    "null",
    "--trainer.check_val_every_n_epoch",
    "1",
]


def fake_source(root: Path) -> Path:
    """A small tree of .py files, with test folders that preparation must skip."""
    for i in range(40):
        folder = root / ("pkg" if i % 2 else "lib") / f"m{i // 10}"
        folder.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(3 + i % 7))
        (folder / f"mod{i}.py").write_text(body)
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text("assert True\n")
    (root / "lib" / "tests").mkdir()
    (root / "lib" / "tests" / "t.py").write_text("assert False\n")
    (root / "empty.py").write_text("")
    return root


@pytest.fixture(scope="module")
def token_data(tmp_path_factory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("lm")
    source = fake_source(base / "src")
    out = base / "shards"
    meta = prepare(
        out,
        root=source,
        val_percent=15,
        test_percent=10,
        chunk_tokens=700,
        piece_tokens=PIECE,
        num_workers=0,
        log=lambda *_: None,
    )
    return source, out, meta


def test_every_train_byte_lands_in_the_chunks_once_and_splits_are_by_file(token_data):
    from litdata import StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    source, out, meta = token_data
    files = meta["files"]
    assert not any(
        "test" in Path(f).parts[:-1] or "tests" in Path(f).parts[:-1]
        for s in files.values()
        for f in s
    )
    assert sum(map(len, files.values())) == len(source_files(source)) == 41
    assert all(files[s] for s in ("train", "val", "test"))
    assert set(files["train"]).isdisjoint(files["val"]) and set(files["train"]).isdisjoint(
        files["test"]
    )

    block = CONTEXT + 1
    dataset = StreamingDataset(str(out / "train"), item_loader=TokensLoader(block), shuffle=False)
    chunks = json.loads((out / "train" / "index.json").read_text())["chunks"]
    # Pieces: every byte of every train file in exactly one piece, in file order ...
    pieces = packing_order([str(source / f) for f in files["train"]], PIECE)
    for name in files["train"]:
        mine = sorted((start, end) for path, start, end in pieces if path == str(source / name))
        text = (source / name).read_bytes()
        assert b"".join(text[a:b] for a, b in mine) == text
        assert all(0 < b - a <= PIECE for a, b in mine) or text == b""
    # ... packed in a shuffled order, so consecutive pieces come from different files.
    assert [p[0] for p in pieces] != sorted(p[0] for p in pieces)
    items = []
    for path, start, end in pieces:
        items.append(Path(path).read_bytes()[start:end] + bytes([SEPARATOR]))
    blocks = [bytes(dataset[i].tolist()) for i in range(len(dataset))]
    position, tail_total = 0, 0
    for chunk in chunks:
        text = b"".join(items[position : position + chunk["chunk_size"]])
        position += chunk["chunk_size"]
        kept = len(text) // block
        assert b"".join(blocks[:kept]) == text[: kept * block]  # in order, once
        blocks = blocks[kept:]
        tail_total += len(text) - kept * block
        assert len(text) - kept * block < block  # the documented tail: under one block per chunk
    assert position == len(items) and not blocks
    assert tail_total < block * len(chunks)


def test_preparation_is_skipped_when_up_to_date(token_data):
    source, out, meta = token_data
    index = out / "train" / "index.json"
    before = index.stat().st_mtime_ns
    said = []
    again = prepare(
        out,
        root=source,
        val_percent=15,
        test_percent=10,
        chunk_tokens=700,
        piece_tokens=PIECE,
        num_workers=0,
        log=said.append,
    )
    assert again == meta and index.stat().st_mtime_ns == before
    assert "up to date" in said[0]


def lm_fit(run_dir: Path, data: Path, *extra: str, config: str | tuple = "lm") -> list[str]:
    return train_cmd("fit", run_dir, data, *TINY, *extra, config=config, model_and_data=())


def metrics(run_dir: Path) -> list[dict]:
    path = sorted((run_dir / "logs").glob("version_*/metrics.csv"))[-1]
    return list(csv.DictReader(path.open()))


@pytest.mark.parametrize(
    "world_size,drop_last,accumulate",
    [(1, "true", "3"), pytest.param(2, "false", "2", marks=[pytest.mark.ddp, pytest.mark.slow])],
)
def test_token_budget_plans_exactly_the_steps_executed(
    tmp_path, token_data, world_size, drop_last, accumulate
):
    _, data, _ = token_data
    run_dir = tmp_path / "run"
    extra = [
        "--plan.max_tokens",
        "6000",
        "--data.drop_last",
        drop_last,
        "--trainer.accumulate_grad_batches",
        accumulate,
        "--lr_schedule.decay",
        "cosine",
        "--lr_schedule.final_lr_factor",
        "0.1",
        "--trainer.log_every_n_steps",
        "2",
    ]
    if world_size == 2:
        extra += CPU_DDP
    result = run(lm_fit(run_dir, data, *extra))
    plan = load_plan(run_dir)
    assert plan["length_from"] == "max_tokens" and plan["max_tokens"] == 6000
    assert plan["tokens_per_sample"] == CONTEXT
    assert plan["global_tokens_per_step"] == CONTEXT * 8 * world_size * int(accumulate)
    assert plan["max_steps"] * plan["global_tokens_per_step"] >= 6000  # rounded up, never down
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == plan["max_steps"]
    lrs = {int(r["step"]): float(r["lr-AdamW"]) for r in metrics(run_dir) if r.get("lr-AdamW")}
    assert sorted(lrs) == list(range(plan["max_steps"]))
    assert lrs[plan["max_steps"] - 1] == pytest.approx(0.003 * 0.1)
    assert any(r.get("val/loss") for r in metrics(run_dir)), "the final weights are validated"
    # lm.yaml's ThroughputMonitor, its functions given as import paths, ran and logged
    assert any(r.get("train/samples") for r in metrics(run_dir))
    assert "tokens per optimizer step" in result.stdout + result.stderr
    # FLOP/s: the LM states no FLOPs, its first batch is counted (no known peak on a CPU)
    flops = [
        float(r["train/device/flops_per_sec"])
        for r in metrics(run_dir)
        if r.get("train/device/flops_per_sec")
    ]
    assert flops and min(flops) > 0
    assert "GFLOP per batch on this rank" in result.stdout + result.stderr


@pytest.mark.slow  # torch.compile on a CPU: about half a minute per launch
def test_a_compiled_run_resumes_uncompiled_and_exports_clean_names(tmp_path, token_data):
    """``--model.init_args.compile true``: SIGKILL right after step 4's checkpoint, the
    relaunch with compile off loads it strictly (Lightning's default) and trains to the
    end; the checkpoint's and the export's names are the module's own."""
    from conftest import kill_after_step
    from safetensors.torch import load_file

    from examples.lm.network import TinyTransformer
    from train_template.export import weights_of

    _, data, _ = token_data
    run_dir = tmp_path / "compiled"
    extra = ["--plan.max_tokens", "2048", "--checkpoint.every_n_train_steps", "4"]
    kill_after_step(lm_fit(run_dir, data, *extra, "--model.init_args.compile", "true"), 4)
    weights, step = weights_of(str(run_dir / "checkpoints" / "last.ckpt"))
    assert step == 4
    tiny = TinyTransformer(context=CONTEXT, width=32, layers=1, heads=2)  # TINY's network
    names = {name for name, _ in tiny.named_parameters()}
    assert {name.removeprefix("network.") for name in weights} >= names
    assert not any("_orig_mod" in name for name in weights)
    resumed = run(
        lm_fit(run_dir, data, *extra, "--model.init_args.compile", "false", "--ckpt_path", "last")
    )
    plan = load_plan(run_dir)
    assert f"resumed at global step 4 of {plan['max_steps']}" in resumed.stdout + resumed.stderr
    assert weights_of(str(run_dir / "checkpoints" / "last.ckpt"))[1] == plan["max_steps"] > 4
    run(
        [
            PYTHON,
            str(REPO / "train.py"),
            "export",
            "--ckpt_path",
            str(run_dir / "checkpoints" / "last.ckpt"),
        ]
    )
    exported = load_file(run_dir / "checkpoints" / "last.safetensors")
    assert not any("_orig_mod" in name for name in exported)
    assert {name.removeprefix("network.") for name in exported} >= names


@pytest.mark.parametrize(
    "layout",
    [
        "one-process",
        pytest.param("ddp", marks=[pytest.mark.ddp, pytest.mark.slow]),
        # configs/lm.yaml + configs/fsdp.yaml: the LM shards its blocks in configure_model
        pytest.param("fsdp2", marks=[pytest.mark.ddp, pytest.mark.slow]),
    ],
)
def test_lm_sigkill_after_mid_epoch_checkpoint_resumes_bitwise(tmp_path, token_data, layout):
    _, data, _ = token_data
    extra = ["--plan.max_tokens", "12000", "--checkpoint.every_n_train_steps", "4"]
    config: str | tuple = "lm"
    if layout == "ddp":
        extra += CPU_DDP
    if layout == "fsdp2":
        config = ("lm", "fsdp")
        extra += [*CPU_DDP[:4], "--trainer.precision", "32-true"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run(lm_fit(reference, data, *extra, config=config))
    plan = load_plan(reference)
    killed_at = kill_after_checkpoint(
        lm_fit(resumed, data, *extra, config=config), resumed, plan["steps_per_epoch"] + 1
    )
    assert killed_at % plan["steps_per_epoch"] != 0 and killed_at < plan["max_steps"]
    run(lm_fit(resumed, data, *extra, "--ckpt_path", "last", config=config))
    assert assert_same_weights(reference, resumed)["global_step"] == plan["max_steps"]


@pytest.mark.ddp
@pytest.mark.slow  # two processes under torchrun, then predict
def test_torchrun_two_processes_run_lm_yaml_and_predict_writes_text(tmp_path, token_data):

    _, data, _ = token_data
    run_dir = tmp_path / "run"
    cmd = lm_fit(
        run_dir,
        data,
        "--plan.max_tokens",
        "4000",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    )
    run(
        [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            *cmd[1:],
        ],
        timeout=400,
    )
    plan = load_plan(run_dir)
    assert plan["world_size"] == 2 and plan["length_from"] == "max_tokens"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == plan["max_steps"]

    run(
        train_cmd(
            "predict",
            run_dir,
            data,
            *TINY,
            "--ckpt_path",
            "last",
            "--model.init_args.new_tokens",
            "20",
            config="lm",
            model_and_data=(),
        )
    )
    text = sorted((run_dir / "logs").glob("version_*/predictions.txt"))[-1].read_text()
    assert text.startswith("def fibonacci(n):\n") and text.count("-" * 72) == 3


@pytest.mark.s3
@pytest.mark.slow
def test_preparation_into_object_storage_is_idempotent(tmp_path):
    """``scripts/prepare_lm_data.py --out s3://...`` (and the digits' ``prepare_data.py``):
    every split and ``dataset.json`` in the store; a second run skips as on a disk."""
    import json as json_module  # the standard library's json package is the source

    from cluster import object_store

    (tmp_path / "s3").mkdir()
    with object_store(tmp_path / "s3", [free_port() for _ in range(10)]) as store:
        lm = f"s3://{store.bucket('template-data')}/lm"
        prepare_lm = [
            PYTHON, str(REPO / "scripts" / "prepare_lm_data.py"), "--out", lm,
            "--root", str(Path(json_module.__file__).parent), "--num-workers", "0",
            "--val-percent", "20", "--test-percent", "20",
        ]  # fmt: skip
        digits = f"s3://{store.bucket('template-data')}/digits"
        prepare = [PYTHON, str(REPO / "scripts" / "prepare_data.py"), "--out", digits,
                   "--num-workers", "0"]  # fmt: skip

        def objects() -> dict[str, tuple]:
            listed = store.client().list_objects_v2(Bucket="template-data")["Contents"]
            return {o["Key"]: (o["ETag"], o["LastModified"], o["Size"]) for o in listed}

        run(prepare_lm, env=store.env)
        run(prepare, env=store.env)
        written = objects()
        assert "up to date" in run(prepare_lm, env=store.env).stdout
        assert "up to date" in run(prepare, env=store.env).stdout
        assert objects() == written, "a second preparation rewrote or added objects"
        keys = set(written)
        for name in ("lm", "digits"):
            assert f"{name}/dataset.json" in keys
            assert {f"{name}/{split}/index.json" for split in ("train", "val", "test")} <= keys
