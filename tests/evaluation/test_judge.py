"""Judges: a tiny reward model against scores computed independently with transformers, an LLM judge
over real HTTP against small local OpenAI-compatible servers, the win-rate summary by hand, and
`smolalign eval --judge` end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import read_jsonl, tiny_llama_config, write_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForSequenceClassification

from smolalign.cli import main
from smolalign.core.layouts import block_tokens
from smolalign.core.scoring import PairScoring
from smolalign.errors import UserError
from smolalign.evaluation.judge import ChatJudge, Verdict, build_judge, parse_choice, win_rate_summary

CPU = torch.device("cpu")
PROMPTS = [
    "What is the capital of France?",
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a prime number."},
    ],
    "How do I boil an egg?",
]
POLICY = ["Paris.", "Seven is a prime number.", "Put it in boiling water for about nine minutes."]
REFERENCE = ["I think it is Lyon.", "Seven.", "Put it in boiling water for about nine minutes."]


# ----------------------------------------------------------------------------------------------------------
# Reward-model judge


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tokenizer):
    """Folder of a tiny Llama reward model (one-output sequence classification) with the SmolLM2 tokenizer."""
    torch.manual_seed(0)
    config = tiny_llama_config(tokenizer, num_labels=1)
    folder = tmp_path_factory.mktemp("tiny-reward-model")
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def independent_scores(folder, texts: list[str], *, add_special_tokens: bool) -> list[float]:
    """One text at a time, no padding: the reward of each text straight from transformers."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return [
            model(**tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens))
            .logits[0, 0]
            .item()
            for text in texts
        ]


def test_reward_model_verdicts_follow_independent_scores(reward_model, tokenizer):
    judge = build_judge(
        reward_model=str(reward_model), url=None, model=None, api_key_env="UNUSED", device=CPU
    )
    # A token budget that puts the two shortest pairs in one forward pass and the third in another.
    pairs = sorted((judge.answers_as_pair(i, *answers) for i, answers in enumerate(zip(PROMPTS, POLICY, REFERENCE,
                                                                                        strict=True))), key=block_tokens)
    judge.scoring = dataclasses.replace(judge.scoring, max_tokens=block_tokens(pairs[0]) + block_tokens(pairs[1]))
    widths: list[int] = []
    judge.model.model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    verdicts = judge.judge(PROMPTS, POLICY, REFERENCE)
    assert len(widths) == 2 and widths == sorted(widths)  # shortest pairs first: rows of similar lengths

    def chat(prompt, answer):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], tokenize=False
        )

    policy = independent_scores(
        reward_model, [chat(p, a) for p, a in zip(PROMPTS, POLICY, strict=True)], add_special_tokens=False
    )
    reference = independent_scores(
        reward_model, [chat(p, a) for p, a in zip(PROMPTS, REFERENCE, strict=True)], add_special_tokens=False
    )
    assert [v.policy_score for v in verdicts] == pytest.approx(policy, abs=1e-5)
    assert [v.reference_score for v in verdicts] == pytest.approx(reference, abs=1e-5)
    # The distinct answers differ by far more than float noise, so their order is not a float tie.
    assert all(abs(p - r) > 1e-3 for p, r in zip(policy[:2], reference[:2], strict=True))
    assert [v.winner for v in verdicts[:2]] == ["policy" if p > r else "reference" for p, r in zip(policy[:2], reference[:2], strict=True)]
    # Identical answers are a tie by definition: one text, scored once.
    assert verdicts[2].winner == "tie"
    assert verdicts[2].policy_score == verdicts[2].reference_score
    assert judge.name == str(reward_model)


def test_both_answers_to_a_prompt_share_its_tokens(reward_model, tokenizer):
    """The tokens both texts begin with (system prompt, conversation, the assistant's header) run once; each
    answer's rest follows them; identical texts are a single sequence."""
    judge = build_judge(reward_model=str(reward_model), url=None, model=None, api_key_env="UNUSED", device=CPU)

    def ids(prompt, answer):
        return judge.tokenizer(judge.text(prompt, answer), add_special_tokens=False)["input_ids"]

    pair = judge.answers_as_pair(7, PROMPTS[1], POLICY[1], REFERENCE[1])
    assert pair.index == 7
    assert pair.prompt_ids + pair.chosen_ids == ids(PROMPTS[1], POLICY[1])
    assert pair.prompt_ids + pair.rejected_ids == ids(PROMPTS[1], REFERENCE[1])
    prompt = tokenizer.apply_chat_template(PROMPTS[1], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) > 10 and pair.prompt_ids[: len(prompt_ids)] == prompt_ids  # the whole prompt is shared
    assert pair.chosen_ids[0] != pair.rejected_ids[0]
    same = judge.answers_as_pair(0, PROMPTS[2], POLICY[2], REFERENCE[2])
    assert same.rejected_ids is None and same.prompt_ids + same.chosen_ids == ids(PROMPTS[2], POLICY[2])


def test_reward_model_without_chat_template_scores_prompt_answer_eos(reward_model, tmp_path):
    """Without a template the text is what TRL's RewardTrainer trains on: prompt + answer + EOS (and an
    HH-RLHF transcript for a conversation)."""
    plain = tmp_path / "plain-reward-model"
    AutoModelForSequenceClassification.from_pretrained(reward_model).save_pretrained(plain)
    tokenizer = AutoTokenizer.from_pretrained(reward_model)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)

    judge = build_judge(reward_model=str(plain), url=None, model=None, api_key_env="UNUSED", device=CPU)
    assert not judge.tokenizer.chat_template
    verdicts = judge.judge(PROMPTS[:2], POLICY[:2], REFERENCE[:2])

    eos = tokenizer.eos_token
    conversation = "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: Name a prime number.\n\nAssistant: "
    texts = [PROMPTS[0] + POLICY[0] + eos, conversation + POLICY[1] + eos]
    assert [v.policy_score for v in verdicts] == pytest.approx(
        independent_scores(plain, texts, add_special_tokens=True), abs=1e-5
    )


def test_reward_model_saved_by_trl_reward_trainer(tiny_model, tokenizer, tmp_path):
    """The folder TRL's RewardTrainer writes (a fresh one-output head on a causal LM) is a valid judge."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    pairs = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
            }
            for p, c, r in zip(PROMPTS[::2], POLICY[::2], REFERENCE[::2], strict=True)
        ]
    )
    args = RewardConfig(
        output_dir=str(tmp_path / "trl"),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model(0), num_labels=1)
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "reward"))

    judge = build_judge(
        reward_model=str(tmp_path / "reward"), url=None, model=None, api_key_env="UNUSED", device=CPU
    )
    verdicts = judge.judge(PROMPTS, POLICY, REFERENCE)
    assert all(isinstance(v.policy_score, float) for v in verdicts)
    assert verdicts[2].winner == "tie"


def test_lora_reward_adapter_on_a_causal_lm(tiny_model, tokenizer, tmp_path):
    """A LoRA reward adapter (PEFT task SEQ_CLS, trained head saved with it) on a causal-LM base folder."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model(0), num_labels=1)
    peft_model = get_peft_model(
        base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"])
    )
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # as if trained: zero-initialised LoRA would leave the base unchanged
            torch.nn.init.normal_(parameter, std=0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")

    judge = build_judge(
        reward_model=str(tmp_path / "adapter"), url=None, model=None, api_key_env="UNUSED", device=CPU
    )
    verdicts = judge.judge(PROMPTS[:2], POLICY[:2], REFERENCE[:2])
    peft_model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        expected = [
            peft_model(
                **tokenizer(judge.text(p, a), return_tensors="pt", add_special_tokens=False)
            ).logits.item()
            for p, a in zip(PROMPTS[:2], POLICY[:2], strict=True)
        ]
    assert [v.policy_score for v in verdicts] == pytest.approx(expected, abs=1e-5)


def test_causal_lm_is_not_a_reward_model(tiny_model):
    with pytest.raises(UserError, match="not a reward model"):
        build_judge(reward_model=str(tiny_model(0)), url=None, model=None, api_key_env="UNUSED", device=CPU)


# ----------------------------------------------------------------------------------------------------------
# LLM judge over HTTP

Reply = Callable[[dict], tuple[int, dict]]


class JudgeServer:
    """An OpenAI-compatible endpoint on 127.0.0.1 whose answers come from `reply(request_body)`."""

    def __init__(self, reply: Reply):
        self.requests: list[dict] = []  # {"path", "headers", "body"} of every request received
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, answer = reply(body)
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up waiting (the timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def serve():
    servers: list[JudgeServer] = []

    def start(reply: Reply) -> JudgeServer:
        servers.append(JudgeServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def completion(text: str) -> tuple[int, dict]:
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def prefers_marker(body: dict) -> tuple[int, dict]:
    """Picks the answer that contains the word 'MARKER', like a judge with a clear preference."""
    question = body["messages"][-1]["content"]
    answer_a = question.split("[The Start of Answer A]")[1].split("[The End of Answer A]")[0]
    answer_b = question.split("[The Start of Answer B]")[1].split("[The End of Answer B]")[0]
    return completion("A" if "MARKER" in answer_a else "B" if "MARKER" in answer_b else "tie")


def fast_judge(url: str, **settings) -> ChatJudge:
    return ChatJudge(url, model="judge-model", **{"backoff": 0.01, **settings})


def test_chat_judge_prefers_the_better_answer_in_both_orders(serve):
    server = serve(prefers_marker)
    judge = build_judge(
        reward_model=None, url=server.url, model="judge-model", api_key_env="UNUSED", device=CPU
    )
    verdicts = judge.judge(
        PROMPTS, ["a MARKER answer", "plain", "plain"], ["plain", "a MARKER answer", "plain"]
    )

    assert [v.winner for v in verdicts] == ["policy", "reference", "tie"]
    assert [(v.policy_score, v.reference_score) for v in verdicts] == [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)]
    assert len(server.requests) == 2 * len(PROMPTS)
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["body"]["model"] == "judge-model"
    assert first["body"]["temperature"] == 0
    assert 0 < first["body"]["max_tokens"] <= 32
    assert "What is the capital of France?" in first["body"]["messages"][-1]["content"]
    # The policy's answer is shown first, then second.
    assert (
        "MARKER" in server.requests[0]["body"]["messages"][-1]["content"].split("[The Start of Answer B]")[0]
    )
    assert (
        "MARKER" in server.requests[1]["body"]["messages"][-1]["content"].split("[The Start of Answer B]")[1]
    )


def test_position_bias_cancels_to_ties(serve):
    server = serve(lambda body: completion("A"))
    verdicts = fast_judge(server.url).judge(PROMPTS, POLICY, REFERENCE)
    assert [v.winner for v in verdicts] == ["tie"] * len(PROMPTS)
    assert all(v.policy_score == v.reference_score == 0.5 for v in verdicts)


def test_server_errors_are_retried(serve):
    failures = iter([(429, {"error": {"message": "rate limited"}}), (503, {"message": "overloaded"})])
    server = serve(lambda body: next(failures, None) or prefers_marker(body))
    verdicts = fast_judge(server.url).judge(PROMPTS[:1], ["MARKER"], ["plain"])
    assert [v.winner for v in verdicts] == ["policy"]
    assert len(server.requests) == 4  # two failures, then one answer per order


def test_a_server_slower_than_the_read_timeout_fails_after_the_retries(serve):
    released = threading.Event()

    def stalled(body):  # answers only once the test is over: only the read timeout can end each request
        released.wait(timeout=60)
        return completion("A")

    server = serve(stalled)
    try:
        with pytest.raises(UserError, match=r"/v1/chat/completions failed 3 times.*[Rr]ead timed out"):
            fast_judge(server.url, read_timeout=0.2).judge(PROMPTS[:1], POLICY[:1], REFERENCE[:1])
        # The server records a request when its handler thread reads it, which may trail the client's timeout.
        deadline = threading.Event()
        for _ in range(200):
            if len(server.requests) == 3:
                break
            deadline.wait(0.05)
        assert len(server.requests) == 3
    finally:
        released.set()


def test_an_unreachable_endpoint_fails_with_one_sentence(serve):
    server = serve(lambda body: completion("A"))
    url = server.url
    server.close()  # nothing listens on that port any more
    with pytest.raises(UserError, match="failed 3 times; the last failure: ConnectionError"):
        fast_judge(url).judge(PROMPTS[:1], POLICY[:1], REFERENCE[:1])


def test_api_key_from_the_named_environment_variable(serve, monkeypatch):
    server = serve(lambda body: completion("tie"))
    monkeypatch.setenv("SMOLALIGN_TEST_JUDGE_KEY", "sk-test-123")
    options = {
        "reward_model": None,
        "url": server.url,
        "model": "m",
        "api_key_env": "SMOLALIGN_TEST_JUDGE_KEY",
    }
    build_judge(**options, device=CPU).judge(PROMPTS[:1], POLICY[:1], REFERENCE[:1])
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer sk-test-123"

    monkeypatch.delenv("SMOLALIGN_TEST_JUDGE_KEY")
    build_judge(**options, device=CPU).judge(PROMPTS[:1], POLICY[:1], REFERENCE[:1])
    assert "Authorization" not in server.requests[-1]["headers"]


def test_a_client_error_fails_at_once_with_the_servers_message(serve):
    server = serve(lambda body: (400, {"error": {"message": "The model `judge-model` does not exist."}}))
    with pytest.raises(UserError, match=r"HTTP 400: The model `judge-model` does not exist"):
        fast_judge(server.url).judge(PROMPTS[:1], POLICY[:1], REFERENCE[:1])
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("reply", "choice"),
    [
        ("A", "A"),
        ("B", "B"),
        (" **B**\n", "B"),
        ("Answer: A.", "A"),
        ("Tie", "tie"),
        ("It's a tie.", "tie"),
        ("a tie", "tie"),
        ("I cannot decide", None),
        ("", None),
    ],
)
def test_parse_choice(reply, choice):
    assert parse_choice(reply) == choice


# ----------------------------------------------------------------------------------------------------------
# Win rate and options


def wilson(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson's interval from its definition: the proportions q with (p - q)^2 = z^2 q (1 - q) / n, i.e.
    the roots of (1 + z^2/n) q^2 - (2p + z^2/n) q + p^2 = 0 (a different route from the module's formula)."""
    p = successes / n
    a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


def test_win_rate_summary_counts_ties_as_half():
    verdicts = (
        [Verdict("policy", 1.0, 0.0)] * 5
        + [Verdict("reference", 0.0, 1.0)] * 2
        + [Verdict("tie", 0.5, 0.5)] * 3
    )
    summary = win_rate_summary(verdicts, "rm")
    low, high = wilson(6.5, 10)
    assert summary == {
        "judge/name": "rm",
        "judge/n": 10,
        "judge/wins": 5,
        "judge/losses": 2,
        "judge/ties": 3,
        "judge/win_rate": 0.65,
        "judge/ci_low": pytest.approx(low),
        "judge/ci_high": pytest.approx(high),
    }
    assert (low, high) == pytest.approx((0.35367, 0.86307), abs=1e-5)


def test_win_rate_summary_all_wins():
    summary = win_rate_summary([Verdict("policy", 2.0, 1.0)] * 4, "rm")
    assert summary["judge/win_rate"] == 1.0
    assert summary["judge/ci_high"] == pytest.approx(1.0)
    assert summary["judge/ci_low"] == pytest.approx(4 / (4 + 1.959963984540054**2))  # Wilson at p = 1


def test_build_judge_errors(tmp_path):
    with pytest.raises(UserError, match="not both"):
        build_judge(reward_model="rm", url="http://127.0.0.1:1/v1", model="m", api_key_env="K", device=CPU)
    with pytest.raises(UserError, match="--judge_model"):
        build_judge(reward_model=None, url="http://127.0.0.1:1/v1", model=None, api_key_env="K", device=CPU)
    with pytest.raises(UserError, match="no judge given"):
        build_judge(reward_model=None, url=None, model=None, api_key_env="K", device=CPU)
    with pytest.raises(UserError, match="does not exist"):
        build_judge(reward_model=str(tmp_path / "missing"), url=None, model=None, api_key_env="K", device=CPU)
    with pytest.raises(UserError, match="base URL before /chat/completions"):
        build_judge(
            reward_model=None,
            url="http://127.0.0.1:1/v1/chat/completions",
            model="m",
            api_key_env="K",
            device=CPU,
        )
    with pytest.raises(UserError, match="http"):
        build_judge(reward_model=None, url="127.0.0.1:8000/v1", model="m", api_key_env="K", device=CPU)


# ----------------------------------------------------------------------------------------------------------
# `smolalign eval --judge`


def test_a_judge_needs_generations(tmp_path, tiny_model, rows, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(tiny_model(0)), "--dataset", str(data), "--judge", str(tiny_model(1))])
    assert exit_info.value.code == 2
    assert "--generate" in capsys.readouterr().err


def test_a_trained_reward_model_judges_generations(tmp_path, tiny_model, rows):
    """The fully local judge: `algorithm: reward` trains it, `smolalign eval --judge` uses it."""
    from smolalign.config.train import load_config
    from smolalign.training.loop import run_training

    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    judge = run_training(load_config(None, {"model": str(tiny_model(1)), "algorithm": "reward", "dataset": str(data),
                                     "max_steps": 1, "output_dir": str(tmp_path / "rm")}))
    out = tmp_path / "eval"
    main(["eval", "--model", str(tiny_model(0)), "--ref_model", str(tiny_model(1)), "--dataset", str(data),
          "--output_dir", str(out), "--generate", "3", "--max_new_tokens", "4", "--judge", str(judge)])
    summary = json.loads((out / "eval.json").read_text())
    generations = read_jsonl(out / "generations.jsonl")
    assert summary["judge/n"] == 3 == len(generations)
    wins = sum(g["verdict"] == "policy" for g in generations)
    ties = sum(g["verdict"] == "tie" for g in generations)
    assert summary["judge/win_rate"] == pytest.approx((wins + ties / 2) / 3)
    assert summary["judge/ci_low"] <= summary["judge/win_rate"] <= summary["judge/ci_high"]
    assert all((g["policy_score"] > g["reference_score"]) == (g["verdict"] == "policy") for g in generations)


def test_a_bad_judge_url_is_rejected_before_any_scoring(tmp_path, tiny_model, rows, capsys, monkeypatch):
    monkeypatch.setattr(PairScoring, "logps", lambda *a, **k: pytest.fail("scored first"))
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(tiny_model(0)), "--dataset", str(data), "--ref_model", str(tiny_model(1)),
              "--generate", "2", "--judge_url", "127.0.0.1:8000/v1", "--judge_model", "m"])
    assert exit_info.value.code == 2
    assert "http(s) URL" in capsys.readouterr().err
