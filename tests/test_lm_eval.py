"""lm-eval (lm-evaluation-harness, a test-only dependency) scoring a multiple-choice task through the
real server, as users evaluate a served model: its `local-completions` model, unchanged, against
`python -m llama_int8.serve` on SmolLM2 in float32, must score every choice as lm-eval's own
in-process `hf` model (transformers) does on the same folder. The task is local
(tests/data/lm_eval_mc: 30 questions of 4 choices); benchmarks/quality.py runs it per quant mode."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -r requirements-test.txt")

from benchmarks.quality import MODEL_NAME, OFFLINE, TASK, TASK_DIR, choice_scores, evaluate_hf, evaluate_server, \
    metrics, serving, task_manager

TOLERANCE = 1e-4  # per choice, in log-likelihood (nats)


def test_the_local_task_is_what_its_files_say():
    """30 questions of 4 distinct choices, the answer an index among them; lm-eval reads them all."""
    items = [json.loads(line) for line in (TASK_DIR / "items.jsonl").read_text().splitlines()]
    assert len(items) == 30
    assert all(len(set(i["choices"])) == 4 and i["answer"] in range(4) for i in items)
    task = task_manager().load([TASK])["tasks"][TASK]
    docs = list(task.test_docs())
    assert [d["question"] for d in docs] == [i["question"] for i in items]
    assert task.doc_to_choice(docs[0]) == items[0]["choices"]
    assert task.doc_to_target(docs[0]) == items[0]["answer"]


@pytest.fixture(scope="module")
def float32_server(smollm2_hf: Path) -> Iterator[str]:
    """`python -m llama_int8.serve` on SmolLM2's HF folder, --quant none, float32: its completions URL."""
    with serving(smollm2_hf, "none", slots=2, threads=1) as url:
        yield url


@pytest.mark.slow
def test_echo_scores_every_prompt_token_and_the_generated_one(float32_server, smollm2_hf: Path):
    """What lm-eval reads: echo with logprobs 1 and max_tokens 1 answers one entry per prompt token and
    one for the generated token, whatever that token is: lm-eval drops the last entry as the generated
    one (`token_logprobs[ctxlen:-1]`). After "... winter?\nAnswer: spring" SmolLM2's likeliest next
    token is <|im_end|>, a stop token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf)
    prompt = tokenizer("Question: Which season comes after winter?\nAnswer: spring", add_special_tokens=False).input_ids
    body = {"model": MODEL_NAME, "prompt": [prompt], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}  # lm-eval's body, as local-completions sends it
    answer = httpx.post(float32_server, json=body, timeout=60).json()
    logprobs = answer["choices"][0]["logprobs"]
    assert answer["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 1, "total_tokens": len(prompt) + 1}
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) \
        == len(prompt) + 1, answer


@pytest.mark.slow
def test_lm_eval_through_the_server_scores_as_its_own_hf_run(float32_server, smollm2_hf: Path, monkeypatch,
                                                             one_torch_thread):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    reference = evaluate_hf(smollm2_hf)
    served = evaluate_server(float32_server, smollm2_hf, concurrent=2)

    ours, theirs = choice_scores(served), choice_scores(reference)
    assert len(ours) == len(theirs) == 30 and all(len(q) == 4 for q in ours)
    wrong = [f"question {q} choice {c}: served {s}, hf {r}"
             for q, (sq, rq) in enumerate(zip(ours, theirs)) for c, (s, r) in enumerate(zip(sq, rq))
             if abs(s[0] - r[0]) > TOLERANCE or s[1] != r[1]]
    assert not wrong, f"{len(wrong)} of 120 choices scored differently:\n" + "\n".join(wrong[:20])
    assert metrics(served) == metrics(reference)


@pytest.mark.slow
def test_lm_evals_remote_tokenizer_reads_the_servers(float32_server, smollm2_hf: Path):
    """lm-eval's `tokenizer_backend=remote` (its default, `auto`, tries it first) tokenizes through
    /tokenizer_info, /tokenize and /detokenize: the same ids as the checkpoint's own tokenizer."""
    from lm_eval.utils import RemoteTokenizer
    from transformers import AutoTokenizer

    remote, local = RemoteTokenizer(float32_server), AutoTokenizer.from_pretrained(smollm2_hf)
    text = "Question: Which season comes after winter?\nAnswer: spring é"
    assert remote.encode(text) == local(text, add_special_tokens=False).input_ids
    assert remote.decode(remote.encode(text)) == text
    assert remote.eos_token_id == local.eos_token_id and remote.eos_token == local.eos_token
    dialog = [{"role": "user", "content": "Hi"}]
    assert remote.apply_chat_template(dialog) == local.apply_chat_template(dialog, tokenize=False,
                                                                          add_generation_prompt=True)
