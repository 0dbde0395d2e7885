"""Data parallelism on CPU (gloo, 2 processes started by torchrun): the per-rank P×K shards, a 2-rank run against
the 1-rank run with the same global batch, SIGKILL of a rank and resume, resume on another number of ranks, and
sharded captioning (merged shards equal a single-process store, a killed rank resumes without losing or
duplicating an item).

The 2-rank / 1-rank comparison uses a dropout-free tiny X2-VLM and the per-sample loss terms (ArcFace, category,
box): DDP's averaged gradient then equals the 1-process gradient of the whole batch, so the loss curves agree to
float rounding. ITC and ITM draw in-batch negatives per rank (batch_size / world_size - 1 of them instead of
batch_size - 1), which changes those terms by design (see capret_utils.train.distributed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import captions_helpers as H
from capret_utils import captions as C
from capret_utils import train
from capret_utils.common import repo_root
from capret_utils.data import loader as D
from capret_utils.train import distributed as DI
from capret_utils.train import cli as launch

TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------ sampler shards


def test_sharded_batch_sampler_splits_each_global_batch_into_whole_identities():
    labels = np.repeat(np.arange(12), 3)  # 12 identities, 3 items each
    sampler = D.PKBatchSampler(labels, identities_per_batch=4, per_identity=2, seed=5)
    shards = [DI.ShardedBatchSampler(sampler, DI.DistContext(r, 2)) for r in range(2)]
    glob = sampler.batches(0)
    per_rank = [list(s) for s in shards]
    assert len(per_rank[0]) == len(per_rank[1]) == len(glob) == len(shards[0])
    for b, batch in enumerate(glob):
        assert per_rank[0][b] + per_rank[1][b] == batch  # the union, in order, is the 1-rank batch
        for part in (per_rank[0][b], per_rank[1][b]):
            ids = labels[[row for row, _ in part]]
            assert len(part) == 4 and sorted(np.unique(ids, return_counts=True)[1]) == [2, 2]  # K per identity
    # the state is the global sampler's: epoch and position in global batches
    shards[1].advance()
    shards[1].set_epoch(0)
    assert sampler.state_dict() == shards[0].state_dict() == {"epoch": 0, "position": 1, "seed": 5}
    assert list(shards[0])[0] == glob[1][:4]
    with pytest.raises(ValueError, match="cannot share evenly"):
        DI.ShardedBatchSampler(sampler, DI.DistContext(0, 3))
    assert [DI.shard_slice(10, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert DI.shard_for_rank(5, DI.DistContext(1, 2)) == 3 and DI.shard_for_rank(5, DI.SINGLE) == 5


def test_env_context_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = DI.env_context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.enabled) == (1, 2, 1, False, True)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        DI.env_context()
    for k in DI.ENV_VARS:
        monkeypatch.delenv(k)
    assert DI.init_distributed() == DI.SINGLE and DI.current() == DI.SINGLE


def test_read_params_names_the_file_and_the_unknown_field(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model: tiny\nbatch_sise: 8\n")
    with pytest.raises(ValueError, match=r"p\.yaml: unknown parameter\(s\) \['batch_sise'\]"):
        launch.read_params(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        launch.read_params(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------ 2 ranks vs 1


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny preset without dropout / drop-path (so a rank's share of the batch sees the same network as the
    whole batch), saved with save_pretrained; compact special ids for the built WordPiece vocabulary."""
    from capret_utils.x2vlm import X2VLMConfig, X2VLMModel

    cfg = X2VLMConfig.preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             vision_drop_path_rate=0.0, pad_token_id=0, unk_token_id=1, cls_token_id=2,
                             sep_token_id=3, mask_token_id=4)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-nodrop")
    X2VLMModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def params(tiny_folder, smoke_root) -> dict:
    return dict(model=str(tiny_folder), tokenizer="build", recipe="demo", finetune_mode="full",
                use_captions="template", max_steps=6, batch_size=8, per_identity=2, w_itc=0.0, w_itm=0.0,
                box_fraction=1.0, category_recolour=0, eval_every=3, eval_items=0, ckpt_every=1, device="cpu", threads=1,
                num_workers=0, progress=False, seed=1, lr=1e-3, data_root=str(smoke_root))


@pytest.fixture(scope="module")
def one_rank(params, tmp_path_factory):
    run = tmp_path_factory.mktemp("one-rank")
    return run, launch.run_params(params, run)


@pytest.fixture(scope="module")
def two_ranks(params, tmp_path_factory):
    run = tmp_path_factory.mktemp("two-ranks")
    return run, launch.launch(params, run, nproc=2, quiet=True)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return train.load_finetuned(run / train.CHECKPOINT_DIR, device="cpu").model.state_dict()


def _train_rows(history: pd.DataFrame) -> pd.DataFrame:
    return history[history["kind"] == "train"].reset_index(drop=True)


def _assert_same_curve(a: pd.DataFrame, b: pd.DataFrame, rtol: float) -> None:
    ra, rb = _train_rows(a), _train_rows(b)
    assert list(ra["step"]) == list(rb["step"]) and list(ra["epoch"]) == list(rb["epoch"])
    for col in ("loss", "loss_arcface", "loss_category", "loss_box_l1", "loss_box_giou"):
        np.testing.assert_allclose(ra[col], rb[col], rtol=rtol, atol=1e-6, err_msg=col)


@pytest.mark.slow
def test_two_ranks_with_half_batches_follow_the_one_rank_loss_curve(one_rank, two_ranks):
    (run1, r1), (run2, r2) = one_rank, two_ranks
    assert r1.steps == r2.steps == 6
    assert r2.info["world_size"] == 2 and "world_size" not in r1.info
    _assert_same_curve(r1.history, r2.history, rtol=1e-4)
    # the evaluations (sharded embedding, gathered) give the same metrics
    e1, e2 = (h[h["kind"] == "eval"].reset_index(drop=True) for h in (r1.history, r2.history))
    assert list(e1["step"]) == list(e2["step"]) == [3, 6]
    np.testing.assert_allclose(e1["mAP"], e2["mAP"], atol=1e-4)
    w1, w2 = _weights(run1), _weights(run2)
    assert all(torch.allclose(w1[k], w2[k], rtol=1e-3, atol=1e-5) for k in w1)
    # rank 0 alone wrote the run folder: one checkpoint, one history, params and metrics of 2 ranks
    assert json.loads((run2 / "metrics.json").read_text())["world_size"] == 2
    assert json.loads((run2 / "params.json").read_text())["params"]["world_size"] == 2


@pytest.mark.slow
def test_sigkill_of_a_rank_then_resume_matches_the_uninterrupted_two_rank_run(params, two_ranks, tmp_path):
    straight_dir, straight = two_ranks
    run = tmp_path / "killed"
    run.mkdir()
    pfile = run / "params.yaml"
    pfile.write_text(json.dumps(params))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "train_dist_worker.py"), str(pfile), str(run), "0.6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=repo_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    latest = run / train.STATE_DIR / "latest.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if latest.is_file() and json.loads(latest.read_text())["step"] >= 2 and (run / "pid.rank1").is_file():
                break
            if proc.poll() is not None:
                pytest.fail(f"torchrun ended before a rank could be killed: {proc.stdout.read()}")
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint in time")
        os.kill(int((run / "pid.rank1").read_text()), signal.SIGKILL)  # kill -9 of rank 1
        proc.wait(timeout=60)  # torchrun stops rank 0 and fails
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not (run / train.CHECKPOINT_DIR).exists()
    at_kill = json.loads(latest.read_text())["step"]
    assert 2 <= at_kill < 6
    resumed = launch.launch(params, run, nproc=2, quiet=True)
    assert resumed.resumed_from == at_kill and resumed.steps == 6
    a, b = _weights(straight_dir), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed 2-rank run differs from the uninterrupted one"
    assert resumed.metrics["mAP"] == straight.metrics["mAP"]
    np.testing.assert_array_equal(_train_rows(resumed.history)["loss"], _train_rows(straight.history)["loss"])


@pytest.mark.slow
def test_a_one_rank_checkpoint_resumes_on_two_ranks(params, one_rank, tmp_path):
    """The sampler state is global (epoch, position in global batches): a run stopped on 1 process continues on
    2 and ends where the 1-process run ends (per-sample terms; float rounding)."""
    straight_dir, straight = one_rank
    run = tmp_path / "switch"
    part = launch.run_params(params, run, stop_after=3)
    assert part.steps == 3 and not part.metrics
    resumed = launch.launch(params, run, nproc=2, quiet=True)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    _assert_same_curve(straight.history, resumed.history, rtol=1e-4)
    a, b = _weights(straight_dir), _weights(run)
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


# ------------------------------------------------------------------------------------------ captions


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return H.write_dataset(tmp_path_factory.mktemp("df2"), n_train=6, n_val=12)


def _captioner(root: Path) -> C.DialogueCaptioner:
    attrs = C.load_attributes([root / "train", root / "validation"])
    return C.DialogueCaptioner(C.ScriptedQuestioner(), C.AttributeAnswerer(attrs), C.DialogueConfig(rounds=4))


def test_sharded_captioning_equals_single_process_captioning(data_root, tmp_path):
    items = C.load_split_items(data_root, "all")
    single = tmp_path / "single" / C.CAPTIONS_FILE
    C.run_captioning(items, single, _captioner(data_root), batch_size=4, progress=False)
    sharded = tmp_path / "sharded" / C.CAPTIONS_FILE
    stats = [C.run_captioning(items, sharded, _captioner(data_root), batch_size=4, progress=False, shard=(r, 2))
             for r in range(2)]
    assert [s.new for s in stats] == [len(items[r::2]) for r in range(2)]
    shards = C.store_shards(sharded)
    assert [p.name for p in shards] == ["captions.rank0.jsonl", "captions.rank1.jsonl"] and not sharded.exists()
    assert C.load_captions(sharded.parent) == C.load_captions(single)
    by_key = {r["key"]: r for r in C.merged_records(sharded)}
    assert len(by_key) == len(items) and by_key == {r["key"]: r for r in C.CaptionStore(single).records()}
    merged = C.read_captions(sharded).set_index("key").sort_index()
    assert merged["caption"].equals(C.CaptionStore(single).read().set_index("key").sort_index()["caption"])
    # resuming on another number of ranks captions nothing again
    again = [C.run_captioning(items, sharded, _captioner(data_root), batch_size=4, progress=False, shard=(r, 3))
             for r in range(3)] + [C.run_captioning(items, sharded, _captioner(data_root), progress=False)]
    assert sum(s.new for s in again) == 0
    with pytest.raises(ValueError, match="holds \\['dialogue'\\] captions"):
        C.run_captioning(items, sharded, C.TemplateCaptioner(), progress=False, shard=(1, 2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.load_captions(tmp_path / "nothing")


@pytest.mark.slow
def test_sigkill_of_one_caption_rank_then_resume_loses_and_duplicates_nothing(data_root, tmp_path):
    items = C.load_split_items(data_root, "all")
    worker = [sys.executable, str(TESTS / "captions_kill_worker.py"), str(data_root)]
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    clean = tmp_path / "clean.jsonl"
    subprocess.run([*worker, str(clean), "3", "0"], check=True, env=env, capture_output=True, timeout=120)
    store = tmp_path / "run" / "captions.jsonl"
    procs = [subprocess.Popen([*worker, str(store), "3", "0.05", str(r), "2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for r in range(2)]
    rank1 = C.shard_path(store, 1, 2)
    deadline = time.time() + 90
    try:
        while time.time() < deadline:  # two batches of rank 1 on disk, then kill it mid-batch
            if rank1.exists() and rank1.read_bytes().count(b"\n") >= 6:
                break
            assert procs[1].poll() is None, procs[1].stderr.read().decode()
            time.sleep(0.01)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=10)
        assert procs[0].wait(timeout=120) == 0, procs[0].stderr.read().decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == -signal.SIGKILL
    partial = C.CaptionStore(rank1).report()
    assert 6 <= partial.records < len(items[1::2])
    done = subprocess.run([*worker, str(store), "3", "0", "1", "2"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"skipped={partial.records}" in done.stdout
    records = C.merged_records(store)
    assert len(records) == len(items) == len({r["key"] for r in records})  # nothing lost, nothing twice
    assert {r["key"]: r for r in records} == {r["key"]: r for r in C.CaptionStore(clean).records()}
