"""The batch loader: shapes, shift, determinism, exact resume, and the rank/accumulation contract."""

import pytest
import torch

from lmforge.data.loader import BatchLoader, TokenShards
from lmforge.data.prepare import PrepareConfig, run
from lmforge.errors import UserError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    for i in range(30):
        (root / f"{i:02d}.txt").write_text(f"document {i}: " + "abcdefghij" * (5 + i))
    out = root / "out"
    run(
        PrepareConfig(
            inputs=[str(root / "*.txt")],
            out=str(out),
            tokenizer="bytes",
            shard_tokens=700,
            val_fraction=0.2,
            workers=1,
        )
    )
    return out


def test_token_shards(prepared):
    train = TokenShards(prepared, "train")
    assert len(train.shards) > 1
    assert (train.vocab_size, train.eot_id, train.dtype.name) == (257, 256, "uint16")
    assert train.num_tokens == sum(len(s) for s in train.shards)
    assert train.num_documents + TokenShards(prepared, "val").num_documents == 30
    assert train.tokenizer().decode([104, 105, 256]) == "hi<|endoftext|>"
    with pytest.raises(UserError, match="no split 'test'"):
        TokenShards(prepared, "test")
    with pytest.raises(UserError, match="prepare the data first"):
        TokenShards(prepared / "missing")


def test_batches_are_shifted_windows_and_deterministic(prepared):
    shards = TokenShards(prepared)
    loader = BatchLoader(shards, batch_size=4, seq_len=16, seed=7)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # every row is a real window of some shard
    flat = [torch.from_numpy(s.astype("int64")) for s in shards.shards]
    for row_x, row_y in zip(x, y, strict=True):
        window = torch.cat([row_x, row_y[-1:]])
        assert any(torch.equal(s[i : i + 17], window) for s in flat for i in range(len(s) - 16))
    again = BatchLoader(shards, batch_size=4, seq_len=16, seed=7)
    assert torch.equal(again.next_batch()[0], x)
    assert not torch.equal(loader.next_batch()[0], x)  # the next step differs
    assert not torch.equal(BatchLoader(shards, 4, 16, seed=8).next_batch()[0], x)


def test_resume_continues_identically(prepared):
    shards = TokenShards(prepared)
    a = BatchLoader(shards, 3, 8, seed=1)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = BatchLoader(shards, 3, 8, seed=1)
    b.load_state_dict(state)
    for (ex, ey), (bx, by) in zip(expected, [b.next_batch() for _ in range(3)], strict=True):
        assert torch.equal(ex, bx) and torch.equal(ey, by)
    with pytest.raises(UserError, match="cannot resume"):
        BatchLoader(shards, 3, 8, seed=2).load_state_dict(state)


def test_ranks_slice_the_global_batch(prepared):
    """2 ranks x B == 1 process x 2B split into micro-batches of B (the accumulation order the trainer uses)."""
    shards = TokenShards(prepared)
    single = BatchLoader(shards, batch_size=6, seq_len=8, seed=5)
    ranks = [BatchLoader(shards, batch_size=3, seq_len=8, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x, y = single.next_batch()
        rank_batches = [loader.next_batch() for loader in ranks]
        for micro_x, micro_y, (rx, ry) in zip(x.split(3), y.split(3), rank_batches, strict=True):
            assert torch.equal(micro_x, rx) and torch.equal(micro_y, ry)
    assert torch.equal(ranks[1].global_batch(0)[0], single.global_batch(0)[0])


def test_eval_batches_are_sequential_and_repeatable(prepared):
    val = TokenShards(prepared, "val")
    batches = list(val.eval_batches(100, batch_size=2, seq_len=8))
    assert batches and all(x.shape[1] == 8 and torch.equal(x[:, 1:], y[:, :-1]) for x, y in batches)
    first = val.shards[0]
    assert (
        batches[0][0][0].tolist() == first[:8].tolist() and batches[0][0][1].tolist() == first[8:16].tolist()
    )
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, val.eval_batches(100, 2, 8), strict=True))
    assert len(list(val.eval_batches(1, 2, 8))) == 1
    ranked = [list(val.eval_batches(100, 1, 8, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([ranked[0][0][0], ranked[1][0][0]]), batches[0][0])


def test_too_short_split_is_a_user_error(prepared):
    with pytest.raises(UserError, match="lower seq_len"):
        BatchLoader(TokenShards(prepared, "val"), 2, 100_000, seed=0)
