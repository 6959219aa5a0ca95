"""Batched sampling against independent references.

References: transformers' logits processors (built per row, for that row's values) for temperature, top-k, top-p,
min-p and the repetition penalty; a plain Python loop for OpenAI's frequency/presence formula; softmax of the
reference-filtered logits for the sampling distribution; log_softmax of the raw logits for logprobs.
"""

from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmforge.engine.sampling import (
    SamplingTensors,
    apply_penalties,
    apply_top_k_top_p_min_p,
    argmax_rows,
    sample,
    token_counts,
    token_mask,
    update_counts,
)
from lmforge.engine.types import SamplingParams
from lmforge.errors import UserError

CPU = torch.device("cpu")
NO_IDS = torch.zeros(1, 0, dtype=torch.long)  # the warpers ignore input_ids


def hf_warp(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row through transformers' warpers, in generate()'s order, skipping those that are off."""
    scores = row.unsqueeze(0)
    warpers = []
    if p.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(p.temperature)))
    if p.top_k > 0:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        warpers.append(MinPLogitsWarper(p.min_p))
    for w in warpers:
        scores = w(NO_IDS, scores)
    return scores.squeeze(0)


def ours_warp(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    t = SamplingTensors.from_params(params, CPU)
    return apply_top_k_top_p_min_p(logits / t.temperature.unsqueeze(1), t)


def assert_same_filter(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Same -inf pattern exactly; kept values within float32 tolerance (rtol 1.3e-6, atol 1e-5)."""
    kept_ours, kept_ref = torch.isfinite(ours), torch.isfinite(ref)
    mismatch = (kept_ours != kept_ref).sum().item()
    assert mismatch == 0, (
        f"{what}: {mismatch} tokens filtered differently (kept {kept_ours.sum()} vs {kept_ref.sum()})"
    )
    torch.testing.assert_close(ours[kept_ours], ref[kept_ref])


# ---------------------------------------------------------------------------------------------------------------
# SamplingParams


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.logprobs) == (16, 1.0, 0, 1.0, None)
    assert not p.greedy and SamplingParams(temperature=0).greedy
    q = SamplingParams(stop=["\n\n", "User:"], stop_token_ids=[2, 7])
    assert q.stop == ("\n\n", "User:") and q.stop_token_ids == (2, 7)
    assert SamplingParams(stop="END").stop == ("END",)  # not ('E', 'N', 'D')
    assert hash(q) == hash(SamplingParams(stop=("\n\n", "User:"), stop_token_ids=(2, 7)))


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", 3.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("presence_penalty", 2.1),
        ("presence_penalty", -2.1),
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("logprobs", 21),
        ("logprobs", -1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("seed", "42"),
        ("stop", [""]),
        ("stop", [1, 2]),
        ("stop_token_ids", [-1]),
    ],
)
def test_sampling_params_rejects_bad_values(name, value):
    with pytest.raises(UserError, match=name) as info:
        SamplingParams(**{name: value})
    assert "\n" not in str(info.value)


def test_sampling_params_error_message():
    with pytest.raises(UserError, match=r"^temperature must be between 0 and 2, got 3\.5$"):
        SamplingParams(temperature=3.5)


# ---------------------------------------------------------------------------------------------------------------
# filters vs transformers

ROW_PARAMS = {
    "temperature": [SamplingParams(temperature=t) for t in (0.3, 0.7, 1.0, 1.5, 2.0, 0.05)],
    "top_k": [SamplingParams(top_k=k) for k in (1, 2, 5, 50, 0, -1, 1000, 3000)],
    "top_p": [SamplingParams(top_p=p) for p in (0.05, 0.3, 0.5, 0.9, 0.99, 1.0)],
    "min_p": [SamplingParams(min_p=m) for m in (0.0, 0.01, 0.05, 0.2, 0.5, 1.0)],
    "combined": [
        SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.3, top_k=10, top_p=0.5),
        SamplingParams(temperature=0.5, top_p=0.8, min_p=0.1),
        SamplingParams(temperature=1.0, top_k=3, min_p=0.3),
        SamplingParams(temperature=1.8),
        SamplingParams(temperature=0.9, top_k=1000, top_p=0.95, min_p=0.01),
    ],
}


@pytest.mark.parametrize("case", list(ROW_PARAMS))
def test_filters_match_transformers_per_row(case):
    params = ROW_PARAMS[case]
    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 4.0):  # flat and peaked distributions
        logits = torch.randn(len(params), 1000, generator=gen) * scale
        ours = ours_warp(logits, params)
        for i, p in enumerate(params):
            assert_same_filter(ours[i], hf_warp(logits[i], p), f"{case} row {i} ({p}) scale {scale}")


def test_top_k_keeps_ties_like_transformers():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randint(0, 6, (5, 64), generator=gen).float()  # many exact ties
    params = [
        SamplingParams(top_k=k, top_p=p) for k, p in ((1, 1.0), (3, 1.0), (10, 1.0), (5, 0.7), (20, 0.4))
    ]
    ours = ours_warp(logits, params)
    for i, p in enumerate(params):
        assert_same_filter(ours[i], hf_warp(logits[i], p), f"ties row {i}")


# ---------------------------------------------------------------------------------------------------------------
# penalties


def random_histories(batch: int, vocab: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(0, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(0, 30, (batch,))
    ]
    outputs = [
        torch.randint(0, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(0, 30, (batch,))
    ]
    return prompts, outputs


def test_repetition_penalty_matches_transformers():
    vocab, penalties = 100, [1.0, 1.2, 0.8, 2.0, 1.05, 0.5]
    prompts, outputs = random_histories(len(penalties), vocab, seed=2)
    outputs[0], prompts[1] = [], []  # a row with no outputs and one with no prompt
    logits = torch.randn(len(penalties), vocab, generator=torch.Generator().manual_seed(3)) * 3
    params = [SamplingParams(repetition_penalty=r) for r in penalties]
    t = SamplingTensors.from_params(params, CPU)
    ours = apply_penalties(logits, token_counts(outputs, vocab, CPU), token_mask(prompts, vocab, CPU), t)
    for i, r in enumerate(penalties):
        ids = torch.tensor([prompts[i] + outputs[i]], dtype=torch.long)
        ref = (
            RepetitionPenaltyLogitsProcessor(r)(ids, logits[i : i + 1]).squeeze(0) if r != 1.0 else logits[i]
        )
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=0, msg=f"row {i} penalty {r}")


def test_frequency_presence_penalties_match_openai_formula():
    vocab = 50
    pairs = [(0.0, 0.0), (0.5, 0.0), (0.0, 1.0), (-1.0, 0.5), (2.0, -2.0), (1.5, 1.5)]
    prompts, outputs = random_histories(len(pairs), vocab, seed=4)
    logits = torch.randn(len(pairs), vocab, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(frequency_penalty=f, presence_penalty=p) for f, p in pairs]
    t = SamplingTensors.from_params(params, CPU)
    # the prompt mask must not matter: OpenAI's penalties count generated tokens only
    ours = apply_penalties(logits, token_counts(outputs, vocab, CPU), token_mask(prompts, vocab, CPU), t)
    for i, (freq, pres) in enumerate(pairs):
        counts = Counter(outputs[i])
        for tok in range(vocab):
            c = counts.get(tok, 0)
            expected = logits[i, tok].item() - freq * c - pres * (1.0 if c > 0 else 0.0)
            assert ours[i, tok].item() == pytest.approx(expected, abs=1e-5), (i, tok)


def test_token_counts_and_update_counts():
    vocab = 20
    histories = [[1, 1, 5], [], [19, 0, 19, 19]]
    counts = token_counts(histories, vocab, CPU)
    assert counts.dtype == torch.int32
    for i, h in enumerate(histories):
        assert counts[i].tolist() == [Counter(h)[t] for t in range(vocab)]
    update_counts(counts, torch.tensor([1, 3, 19]))
    assert (counts[0, 1], counts[1, 3], counts[2, 19]) == (3, 1, 4)
    assert token_mask(histories, vocab, CPU).sum(dim=1).tolist() == [2, 0, 2]


# ---------------------------------------------------------------------------------------------------------------
# sampling

DIST_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
DIST_PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.4, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.2, min_p=0.15),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.1),
]
DRAWS = 20_000


@pytest.mark.parametrize("seeded", [False, True], ids=["global-rng", "per-row-generators"])
def test_sampling_distribution_matches_filtered_softmax(seeded):
    """20k draws per config, all in one batch (filtered tokens never drawn); max |freq - p| <= 0.01 (about 4.5 standard errors at worst)."""
    torch.manual_seed(1234)
    # per-row generators: two configs keep the 20k-generator setup cheap; the filters are covered above
    configs = DIST_PARAMS[2::3] if seeded else DIST_PARAMS
    params = [p for p in configs for _ in range(DRAWS)]
    logits = DIST_LOGITS.expand(len(params), -1).contiguous()
    generators = [torch.Generator().manual_seed(i) if seeded else None for i in range(len(params))]
    tokens = sample(logits, SamplingTensors.from_params(params, CPU), generators).token_ids
    for j, p in enumerate(configs):
        expected = hf_warp(DIST_LOGITS, p).softmax(dim=-1)
        freq = (
            torch.bincount(tokens[j * DRAWS : (j + 1) * DRAWS], minlength=len(DIST_LOGITS)).double() / DRAWS
        )
        assert freq[expected == 0].sum() == 0, f"{p}: drew a filtered token"
        diff = (freq - expected.double()).abs().max().item()
        assert diff <= 0.01, f"{p}: max |freq - p| = {diff:.4f}\nfreq {freq}\nexpected {expected}"


def test_greedy_rows_take_argmax_of_penalised_logits_in_mixed_batch():
    vocab = 300
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=0, repetition_penalty=1.5),
        SamplingParams(temperature=0.7, seed=3),
        SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0),
    ]
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(6)) * 2
    # make the top raw tokens the repeated ones, so the penalties change the argmax
    prompts = [logits[i].topk(1).indices.tolist() for i in range(len(params))]
    outputs = [logits[i].topk(3).indices.tolist() for i in range(len(params))]
    counts, mask = token_counts(outputs, vocab, CPU), token_mask(prompts, vocab, CPU)
    generators = [None, None, None, torch.Generator().manual_seed(3), None]
    result = sample(logits, SamplingTensors.from_params(params, CPU), generators, counts, mask)

    assert result.token_ids[0] == logits[0].argmax()
    ids = torch.tensor([prompts[2] + outputs[2]])
    assert result.token_ids[2] == RepetitionPenaltyLogitsProcessor(1.5)(ids, logits[2:3]).argmax()
    assert result.token_ids[2] != logits[2].argmax()
    openai = [logits[4, v].item() - 2.0 * outputs[4].count(v) - 2.0 * (v in outputs[4]) for v in range(vocab)]
    assert result.token_ids[4] == max(range(vocab), key=openai.__getitem__)
    assert result.token_ids[1] in logits[1].topk(5).indices
    assert result.token_ids.dtype == torch.int64 and result.token_ids.shape == (len(params),)


def test_all_greedy_batch_equals_argmax_and_ignores_rng():
    logits = torch.randn(7, 100, generator=torch.Generator().manual_seed(7))
    params = [SamplingParams(temperature=0, top_k=3, top_p=0.5)] * 7
    state = torch.get_rng_state()
    tokens = sample(logits, SamplingTensors.from_params(params, CPU), [None] * 7).token_ids
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert torch.equal(state, torch.get_rng_state())  # greedy draws nothing


def test_seeded_row_is_independent_of_the_rest_of_the_batch():
    """A seeded row gives the same 64 tokens alone and inside changing batches of greedy, unseeded and seeded rows."""
    vocab, steps = 500, 64
    gen = torch.Generator().manual_seed(8)
    target = SamplingParams(temperature=1.2, top_k=100, top_p=0.95, seed=42)
    target_logits = torch.randn(steps, vocab, generator=gen) * 2

    g = torch.Generator().manual_seed(42)
    alone = [
        sample(target_logits[s : s + 1], SamplingTensors.from_params([target], CPU), [g]).token_ids.item()
        for s in range(steps)
    ]
    assert len(set(alone)) > 10  # really sampling, not collapsing to the argmax

    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.9),
        SamplingParams(temperature=1.5, top_p=0.5, seed=7),
        SamplingParams(temperature=0.8, min_p=0.1),
    ]
    other_gens = {2: torch.Generator().manual_seed(7)}
    g = torch.Generator().manual_seed(42)
    in_batch = []
    for s in range(steps):
        n_others = int(torch.randint(0, 4, (1,), generator=gen)) + 1
        position = int(torch.randint(0, n_others + 1, (1,), generator=gen))
        chosen = torch.randperm(len(others), generator=gen)[:n_others].tolist()
        params = [others[j] for j in chosen]
        generators = [other_gens.get(j) for j in chosen]
        params.insert(position, target)
        generators.insert(position, g)
        logits = torch.randn(len(params), vocab, generator=gen) * 2
        logits[position] = target_logits[s]
        result = sample(logits, SamplingTensors.from_params(params, CPU), generators)
        in_batch.append(result.token_ids[position].item())
    assert in_batch == alone

    g = torch.Generator().manual_seed(43)
    other_seed = [
        sample(target_logits[s : s + 1], SamplingTensors.from_params([target], CPU), [g]).token_ids.item()
        for s in range(steps)
    ]
    assert other_seed != alone


def test_logprobs_are_of_the_raw_distribution():
    vocab = 200
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.3),
        SamplingParams(temperature=0.5, top_k=10),
        SamplingParams(temperature=1.7, top_p=0.6, frequency_penalty=1.0),
        SamplingParams(temperature=1.0, min_p=0.2, presence_penalty=-1.0),
    ]
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(9)) * 3
    prompts, outputs = random_histories(len(params), vocab, seed=10)
    counts, mask = token_counts(outputs, vocab, CPU), token_mask(prompts, vocab, CPU)
    t = SamplingTensors.from_params(params, CPU)
    result = sample(logits, t, [None] * len(params), counts, mask, num_logprobs=5)

    ref = torch.log_softmax(logits.double(), dim=-1)
    chosen = ref.gather(1, result.token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(result.logprobs.double(), chosen, rtol=0, atol=1e-5)
    assert result.top_ids.shape == result.top_logprobs.shape == (len(params), 5)
    assert (result.top_logprobs[:, :-1] >= result.top_logprobs[:, 1:]).all()
    ref_sorted, _ = ref.sort(dim=-1, descending=True)
    torch.testing.assert_close(result.top_logprobs.double(), ref_sorted[:, :5], rtol=0, atol=1e-5)
    torch.testing.assert_close(ref.gather(1, result.top_ids), ref_sorted[:, :5], rtol=0, atol=1e-5)

    assert sample(logits, t, [None] * len(params), counts, mask).top_ids is None  # num_logprobs=0: none


def test_half_precision_logits_are_sampled_in_float32():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=4), SamplingParams(top_p=0.5)]
    result = sample(logits, SamplingTensors.from_params(params, CPU), [None] * 3, num_logprobs=2)
    assert result.logprobs.dtype == torch.float32 and result.token_ids[0] == logits[0].float().argmax()


def test_penalties_need_counts():
    t = SamplingTensors.from_params([SamplingParams(presence_penalty=1.0)], CPU)
    with pytest.raises(ValueError, match="output_counts"):
        sample(torch.randn(1, 10), t, [None])


@pytest.mark.parametrize("width", [49152, 32000, 50257, 4096, 4095, 1000])
def test_argmax_rows_equals_torch_argmax_ties_included(width):
    """The chunked argmax gives torch.argmax's index (first maximum on ties) for vocabulary widths that split
    into 1,024-wide chunks exactly, leave a tail, or are too narrow to chunk."""
    gen = torch.Generator().manual_seed(width)
    rows = torch.randint(0, 50, (12, width), generator=gen).float()  # many ties of the row maximum
    rows[0] = 7.0  # all equal: index 0
    rows[1, -1] = 100.0  # the maximum in the last position (the tail, when there is one)
    rows[2] = float("-inf")
    rows[2, width // 2] = 0.0
    rows[3, 1500 % width] = rows[3, -3] = 99.0  # a tie between an early chunk and a late one
    rows[4] = torch.randn(width, generator=gen)
    rows[5, 17] = float("nan")  # NaN counts as the maximum, as in torch.argmax
    expected = rows.argmax(dim=-1)
    assert argmax_rows(rows).tolist() == expected.tolist()
    assert argmax_rows(rows[4:6]).tolist() == expected[4:6].tolist()
