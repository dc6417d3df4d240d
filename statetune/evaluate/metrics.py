"""Generation metrics against multiple references: BLEU and chrF (sacrebleu), ROUGE-L (rouge-score), exact match."""

from __future__ import annotations

from statetune.errors import StatetuneError


def _require():
    import logging

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score announces its tokenizer at INFO
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise StatetuneError(f"generation metrics need the eval extra: pip install 'statetune[eval]' ({e})") from None
    return sacrebleu, rouge_scorer


def generation_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF, mean ROUGE-L F1 (best reference) and exact-match rate, all in 0..100.

    ``references[i]`` holds every reference of hypothesis ``i`` (E2E has several per meaning representation).
    """
    sacrebleu, rouge_scorer = _require()
    if not hypotheses:
        return {"bleu": 0.0, "chrf": 0.0, "rouge_l": 0.0, "exact_match": 0.0}
    width = max(len(r) for r in references)
    streams = [[r[j] if j < len(r) else None for r in references] for j in range(width)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score_multi(refs, hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references, strict=True)]
    exact = [hyp.strip() in {r.strip() for r in refs} for hyp, refs in zip(hypotheses, references, strict=True)]
    return {"bleu": sacrebleu.corpus_bleu(hypotheses, streams).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, streams).score,
            "rouge_l": 100.0 * sum(rouge) / len(rouge),
            "exact_match": 100.0 * sum(exact) / len(exact)}
