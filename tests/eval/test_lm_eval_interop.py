"""lm-evaluation-harness reads an lmforge-saved folder and agrees with our log-likelihoods."""

import pytest

from lmforge import checkpoint
from lmforge.eval import perplexity as ppl
from lmforge.eval import tasks


@pytest.mark.slow
def test_lm_eval_hf_model_loads_our_folder_and_matches_loglikelihood(smollm2, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install lm-eval)")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    folder = checkpoint.save(tmp_path / "smollm2", smollm2.model, smollm2.tokenizer)
    lm = HFLM(pretrained=str(folder), device="cpu", batch_size=2, dtype="float32")
    item = tasks.load_multiple_choice(tasks.builtin_dir() / "shop-faq.jsonl")[0]
    pairs = [(item.context, " " + c) for c in item.choices[:2]]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    theirs = lm.loglikelihood(requests, disable_tqdm=True)

    tok = smollm2.tokenizer
    ours = ppl.loglikelihood(
        smollm2.model,
        [tasks.encode_pair(tok, ctx, cont, ppl.prefix_token_id(tok)) for ctx, cont in pairs],
        max_length=2048,
    )
    for (lp, greedy), (their_lp, their_greedy) in zip(ours, theirs, strict=True):
        assert lp == pytest.approx(their_lp, abs=1e-3, rel=1e-4)
        assert greedy == their_greedy
