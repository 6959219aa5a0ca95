"""Perplexity and log-likelihood scoring against independent computations (transformers, plain forwards)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.eval import perplexity as ppl
from lmforge.eval import tasks

TEXT = "\n\n".join(tasks.load_perplexity(tasks.builtin_dir() / "wiki-ppl.jsonl").texts)  # ~520 tokens


def test_windows_score_every_token_once_with_bounded_context():
    for n, max_length, stride in [(1, 4, 2), (2, 4, 4), (10, 4, 4), (10, 4, 1), (37, 8, 3), (37, 64, 16)]:
        ws = ppl.windows(n, max_length, stride)
        scored = [t for w in ws for t in range(w.score_from, w.end)]
        assert scored == list(range(1, n)), (n, max_length, stride)
        for w in ws:
            assert w.end - w.begin <= max_length and w.begin < w.score_from
    with pytest.raises(ValueError):
        ppl.windows(10, 4, 5)


def hf_guide_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """HF's "Perplexity of fixed-length models" loop, run on transformers' own model."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq_len = ids.size(1)
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()  # labels are shifted inside the model
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


@pytest.mark.slow
@pytest.mark.parametrize(("text", "max_length", "stride"), [(TEXT, 1024, 512), (TEXT[:600], 48, 20)])
def test_perplexity_equals_transformers(smollm2, smollm2_hf, text, max_length, stride):
    tok = smollm2.tokenizer
    res = ppl.perplexity(smollm2.model, tok, [text], max_length=max_length, stride=stride, batch_size=4)
    ids = torch.tensor([[ppl.prefix_token_id(tok), *tok.encode(text, parse_special=False)]])
    assert res.num_tokens == ids.size(1) - 1 > (300 if text is TEXT else 100)
    nll, n = hf_guide_nll(smollm2_hf, ids, max_length, stride)
    assert n == res.num_tokens
    ref_loss = nll / n
    assert res.loss == pytest.approx(ref_loss, rel=1e-3), f"ours {res.loss} transformers {ref_loss}"
    assert res.perplexity == pytest.approx(math.exp(ref_loss), rel=1e-3)
    # bits per byte is the same NLL over the UTF-8 bytes of the scored text
    assert res.num_bytes == len(text.encode("utf-8"))
    assert res.bits_per_byte == res.loss * res.num_tokens / math.log(2) / res.num_bytes


def manual_nll(model, seq: list[int], max_length: int, stride: int) -> float:
    """One window at a time, no batching or padding: each token's NLL given the window's left context."""
    total = 0.0
    for w in ppl.windows(len(seq), max_length, stride):
        ids = torch.tensor([seq[w.begin : w.end]])
        with torch.no_grad():
            logp = F.log_softmax(model(ids)[0], dim=-1)
        for t in range(w.score_from, w.end):
            total -= logp[t - w.begin - 1, seq[t]].item()
    return total


def test_strided_batched_windows_equal_manual_computation(smollm2):
    tok, model = smollm2.tokenizer, smollm2.model
    texts = [TEXT[:400], TEXT[400:600]]  # two documents of different lengths share batches
    seqs, _ = ppl.encode_documents(tok, texts)
    res = ppl.perplexity(model, tok, texts, max_length=32, stride=12, batch_size=5)
    expected = sum(manual_nll(model, s, 32, 12) for s in seqs)
    assert res.total_nll == pytest.approx(expected, rel=1e-5)
    assert res.num_tokens == sum(len(s) - 1 for s in seqs)
    # a rerun and a different batch size give the same numbers
    assert ppl.perplexity(model, tok, texts, max_length=32, stride=12, batch_size=5) == res
    other = ppl.perplexity(model, tok, texts, max_length=32, stride=12, batch_size=2)
    assert other.total_nll == pytest.approx(res.total_nll, rel=1e-5)


def test_loglikelihood_equals_direct_forward(smollm2):
    tok, model = smollm2.tokenizer, smollm2.model
    items = tasks.load_multiple_choice(tasks.builtin_dir() / "shop-faq.jsonl")[:2]
    requests = [
        tasks.encode_pair(tok, item.context, " " + c, ppl.prefix_token_id(tok))
        for item in items
        for c in item.choices
    ]
    got = ppl.loglikelihood(model, requests, max_length=2048, batch_size=3)
    for (ctx, cont), (lp, greedy) in zip(requests, got, strict=True):
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ctx + cont]))[0], dim=-1)
        ref = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        assert lp == pytest.approx(ref, abs=1e-3, rel=1e-5)
        ref_greedy = all(logp[len(ctx) - 1 + j].argmax().item() == t for j, t in enumerate(cont))
        assert greedy == ref_greedy


def test_loglikelihood_truncates_context_on_the_left(smollm2):
    model = smollm2.model
    ctx, cont = list(range(100, 140)), [200, 201, 202]
    ((lp, _),) = ppl.loglikelihood(model, [(ctx, cont)], max_length=16)
    ((ref, _),) = ppl.loglikelihood(model, [(ctx[-14:], cont)], max_length=64)
    assert lp == pytest.approx(ref, abs=1e-4)
