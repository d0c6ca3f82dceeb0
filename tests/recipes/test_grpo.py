"""GRPO: the loss against an independent computation for every loss type (advantages from the rewards,
log-probabilities from plain unbatched forward passes of the policy, the policy that sampled and the
reference), the ratio of a single update, kill and resume, rewards from a user's file and from a trained
classifier, bad input, and the offline presets raising held-out accuracy."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from finetune.formats.loading import build_model, load_pretrained
from finetune.model.lora import apply_lora
from finetune.model.tokenizer import EOT_ID, get_tokenizer
from finetune.recipes.grpo_task import GRPOSection, GRPOTask, Prompt, ask
from finetune.recipes.rewards import Rewards, RewardSpec
from finetune.data.records import Record
from tests.helpers import assert_same_files, cli, one_line_error, run_killed_and_resumed

G, MAX_NEW = 4, 6


def digits_reward(completions, **_):
    """A reward with spread: the share of digits among a reply's characters."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) + len(c) % 3 for c in completions]


def prompted_in_phi3(prompts, **_):
    """1 for a completion whose prompt was written in the phi3 style: a reward that sees the style."""
    return [float(p.startswith("<|user|>")) for p in prompts]


def eager_model(seed: int = 0):
    """gpt2-tiny, random, made to end replies early and at different lengths: the final norm's bias and
    the end-of-text embedding share a direction, so its logit is large."""
    torch.manual_seed(seed)
    model = build_model("gpt2-tiny", "random")
    with torch.no_grad():
        u = torch.randn(model.config.n_embd)
        u = 8 * u / u.norm()
        model.ln_f.bias.copy_(u)
        model.wte.weight[EOT_ID] = 0.16 * u
    return model


def prompts() -> list[Prompt]:
    questions = ["What is 2 + 2?", "Name a colour.", "Say something long about the sea and the sky.", "Hi"]
    return [Prompt(Record(q), {"instruction": q, "input": ""}, f"prompts.jsonl:{i + 1}") for i, q in enumerate(questions)]


def unbatched_logps(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """Each completion token's log-probability: one forward pass of prompt + completion, no padding."""
    ids = prompt + completion
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids[:-1]]))[0].double() / temperature
    return F.log_softmax(logits, -1)[torch.arange(len(prompt) - 1, len(ids) - 1), torch.tensor(completion)]


def independent_loss(policy, old, reference, asked, completions, settings: GRPOSection) -> dict[str, float]:
    """TRL's GRPO loss written out token by token in float64."""
    texts = [get_tokenizer().decode([t for t in c if t != EOT_ID]) for c in completions]
    rewards = torch.tensor(digits_reward(texts), dtype=torch.float64)
    grouped = rewards.view(-1, G)
    advantages = rewards - grouped.mean(1).repeat_interleave(G)
    if settings.scale_rewards:
        advantages = advantages / (grouped.std(1).repeat_interleave(G) + 1e-4)
    eps_low, eps_high = settings.epsilon, settings.epsilon_high or settings.epsilon
    per_sequence, tokens, kls, clipped = [], 0, [], 0
    for i, completion in enumerate(completions):
        prompt = asked[i // G].ids
        lp = unbatched_logps(policy, prompt, completion, settings.temperature)
        old_lp = unbatched_logps(old, prompt, completion, settings.temperature) if settings.num_iterations > 1 else lp
        ratio = torch.exp(lp - old_lp)
        A = float(advantages[i])
        per = -torch.minimum(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
        clipped += int((((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))).sum())
        if settings.beta:
            ref = unbatched_logps(reference, prompt, completion, settings.temperature)
            kl = torch.exp(ref - lp) - (ref - lp) - 1
            per = per + settings.beta * kl
            kls.append(kl)
        per_sequence.append(per)
        tokens += len(completion)
    total = sum(float(p.sum()) for p in per_sequence)
    loss = {
        "grpo": sum(float(p.mean()) for p in per_sequence) / len(per_sequence),
        "bnpo": total / tokens,
        "dapo": total / tokens,
        "dr_grpo": total / (len(per_sequence) * settings.max_new_tokens),
    }[settings.loss_type]
    out = {"loss": loss, "clip_ratio": clipped / tokens}
    if kls:
        out["kl"] = float(torch.cat(kls).sum()) / tokens
    return out


def rollout_then_update(settings: GRPOSection, lora: bool = False, packing: bool = False):
    """Rollouts of the start, then the policy moved as an update would (noise on its trainable weights);
    returns (policy, the start, the reference, the asked prompts, the completions, the task's loss terms)."""
    start = eager_model()
    if lora:
        apply_lora(start, rank=4, alpha=8, targets=["attn.qkv", "mlp.fc"])
    base = copy.deepcopy(start)  # the reference: the start, or with LoRA the bare base below
    if lora:
        base = eager_model()
        with torch.no_grad():
            for name, p in start.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)  # the adapter as a LoRA instruct run leaves it: not zero
    rewards = Rewards([RewardSpec(kind="function", function="tests.recipes.test_grpo:digits_reward")], ["instruction"], "alpaca")
    task = GRPOTask(settings, rewards, None if lora or not settings.beta else copy.deepcopy(start), seed=0, packing=packing)
    asked = ask(prompts(), "alpaca", start, settings)
    torch.manual_seed(1)
    batch = task.rollout(start, [{"asked": asked}])[0]
    if packing:  # several sequences share each row
        assert len(batch["packed"]["input_ids"]) < len(batch["targets"]) / 2
    completions = [row[row != -100].tolist() for row in batch["targets"]]
    old = copy.deepcopy(start)
    policy = start
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if not lora or "lora_" in name:
                p.add_(torch.randn_like(p) * (0.02 if lora else 0.004))
    policy.train()
    terms = task.loss(policy, batch)
    got = {k: float(v.detach()) / batch["count"] for k, v in terms.items()}
    return policy, old, base if lora else old, asked, completions, got


@pytest.mark.parametrize("num_iterations", [1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("scale_rewards", [True, False])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_loss_equals_an_independent_computation(loss_type, scale_rewards, beta, num_iterations, packing=False):
    """(Also called with the policy update's sequences packed, data.packing: the same loss from packed rows.)"""
    settings = GRPOSection(
        group_size=G, max_new_tokens=MAX_NEW, temperature=0.9, loss_type=loss_type, scale_rewards=scale_rewards,
        beta=beta, num_iterations=num_iterations, epsilon=0.02, epsilon_high=0.03,
    )
    policy, old, reference, asked, completions, got = rollout_then_update(settings, packing=packing)
    lengths = [len(c) for c in completions]
    assert len(set(lengths)) > 2 and min(lengths) < MAX_NEW, lengths  # ragged groups, as real ones are
    expected = independent_loss(policy, old, reference, asked, completions, settings)
    for name, value in expected.items():
        assert abs(got[name] - value) < 1e-5, (name, got[name], value)
    if num_iterations == 1:
        assert got["clip_ratio"] == 0.0
    else:
        assert got["clip_ratio"] > 0  # the update moved the ratio past the clip somewhere: the clip is tested
    if beta:
        assert got["kl"] > 1e-4


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_packed_updates_give_the_loss_of_the_independent_computation(loss_type, beta):
    test_loss_equals_an_independent_computation(loss_type, True, beta, 2, packing=True)


@pytest.mark.parametrize("packing", [False, True])
def test_with_lora_the_reference_is_the_policy_with_its_adapters_off(packing):
    settings = GRPOSection(group_size=G, max_new_tokens=MAX_NEW, beta=0.1, num_iterations=2, temperature=1.0)
    policy, old, base, asked, completions, got = rollout_then_update(settings, lora=True, packing=packing)
    expected = independent_loss(policy, old, base, asked, completions, settings)
    for name, value in expected.items():
        assert abs(got[name] - value) < 1e-5, (name, got[name], value)
    assert got["kl"] > 1e-3  # the adapter matters: a reference with it on would give a KL near 0


def test_old_logprobs_recorded_while_sampling_equal_a_forward_pass():
    settings = GRPOSection(group_size=G, max_new_tokens=MAX_NEW, num_iterations=2, temperature=0.7)
    model = eager_model()
    rewards = Rewards([RewardSpec(kind="function", function="tests.recipes.test_grpo:digits_reward")], ["instruction"], "alpaca")
    asked = ask(prompts(), "alpaca", model, settings)
    batch = GRPOTask(settings, rewards, None, 0).rollout(model, [{"asked": asked}])[0]
    for i, row in enumerate(batch["targets"]):
        completion = row[row != -100].tolist()
        expected = unbatched_logps(model, asked[i // G].ids, completion, 0.7)
        assert torch.allclose(batch["old_logps"][i][row != -100].double(), expected, atol=1e-5)


# -- runs through the CLI ---------------------------------------------------------------------------


def arithmetic_file(path, n=60):
    from finetune.datasets import ARITHMETIC, bundled

    path.write_text("".join(bundled(ARITHMETIC).read_text().splitlines(keepends=True)[:n]))
    return path


def grpo_args(out, data, *extra):
    return ["run", "grpo", "--quiet", f"output_dir={out}", f"data.path={data}", "model.name=gpt2-tiny",
            "model.init=random", "data.prompt_style=phi3", "finetune.trainable=all", "grpo.group_size=4",
            "grpo.max_new_tokens=3", "train.batch_size=4", "train.epochs=1", "train.lr=1e-3", "train.seed=7",
            "train.eval_every=4", *extra]


def test_a_run_logs_trl_metrics_and_with_one_update_the_ratio_is_one(tmp_path, capsys):
    data = arithmetic_file(tmp_path / "arith.jsonl")
    out = tmp_path / "run"
    code, _, err = cli(capsys, *grpo_args(out, data, "train.eval_at_start=true"))
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    for name in ("loss", "reward", "reward_std", "rewards/number_answer/mean", "clip_ratio",
                 "completions/mean_length", "completions/clipped_ratio", "frac_reward_zero_std"):
        assert all(name in r for r in train), name
    assert all(r["clip_ratio"] == 0.0 for r in train)
    val = [r for r in rows if r["split"] == "val"]
    assert val[0]["step"] == 0 and all(k in val[0] for k in ("pass@1", "reward", "sampled_reward"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test"} and "train" not in metrics
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 6 and responses[0]["prompt_style"] == "phi3" and responses[0]["output"].isdigit()
    assert (out / "curves.png").is_file() and "## GRPO" in (out / "report.md").read_text()


def test_kill_and_resume_ends_bit_identical(tmp_path, capsys, monkeypatch):
    """The sampler draws from the trainer's saved random state: a resumed run samples what the whole run
    sampled, so it ends with the same weights and the same logged rewards."""
    data = arithmetic_file(tmp_path / "arith.jsonl")
    full, cut = run_killed_and_resumed(
        capsys, monkeypatch, lambda out: grpo_args(out, data, "train.checkpoint_every=3", "grpo.num_iterations=2"),
        tmp_path, checkpoints_before_kill=2,
    )
    assert_same_files(full / "best", cut / "best", ("model.safetensors",), ("config.json",))
    assert_same_files(full, cut, (), ("metrics.jsonl", "metrics.json", "responses.jsonl"))


def test_a_reward_from_a_users_file_and_a_classifier_reward_model(tmp_path, capsys):
    from tests.helpers import small_spam_file, tiny_spam_args

    spam = tmp_path / "spam-run"
    assert cli(capsys, *tiny_spam_args(small_spam_file(tmp_path / "spam.tsv", 10), spam, "train.epochs=1"))[0] == 0
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompts, completions, completion_ids, answer, **kwargs):\n"
        "    assert len(prompts) == len(completions) == len(answer)\n"
        "    return [1.0 if len(ids) <= 2 else 0.0 for ids in completion_ids]\n"
    )
    data = arithmetic_file(tmp_path / "arith.jsonl", 20)
    out = tmp_path / "run"
    code, _, err = cli(capsys, *grpo_args(
        out, data,
        f'grpo.rewards=[{{kind: function, function: "{tmp_path / "my_rewards.py"}:short"}}, '
        f'{{kind: classifier, model: "{spam}", label: spam, weight: 0.5}}]',
    ))
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert {"rewards/short/mean", "rewards/classifier/mean"} <= set(train[0])
    spam_p = [r["rewards/classifier/mean"] for r in train]
    assert all(0 < p < 1 for p in spam_p) and len(set(spam_p)) > 1  # probabilities of real replies
    for r in train:
        assert abs(r["reward"] - (r["rewards/short/mean"] + 0.5 * r["rewards/classifier/mean"])) < 1e-9


def bad(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case, extra, expected",
    [
        ("group of one", ["grpo.group_size=1"], "grpo.group_size"),
        ("missing column", ["grpo.rewards=[{kind: exact, column: solution}]"], "column 'solution'"),
        ("weights sum to 0", ["grpo.rewards=[{kind: number, column: answer, weight: 0}]"], "sum to 0"),
        ("unimportable", ["grpo.rewards=[{kind: function, function: 'no_such_module:f'}]"], "cannot import 'no_such_module'"),
        ("no such function", ["grpo.rewards=[{kind: function, function: 'json:no_such'}]"], "no function 'no_such'"),
        ("no room", ["grpo.max_new_tokens=250"], "leaving no room for grpo.max_new_tokens=250"),
        ("regex", ["grpo.rewards=[{kind: regex, pattern: '(('}]"], "not a regular expression"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, case, extra, expected):
    data = arithmetic_file(tmp_path / "arith.jsonl", 20)
    assert expected in one_line_error(capsys, *grpo_args(tmp_path / "run", data, *extra))


def test_bad_rewards_stop_the_run_naming_the_reward_and_the_record(tmp_path, capsys):
    data = arithmetic_file(tmp_path / "arith.jsonl", 20)
    (tmp_path / "r.py").write_text(
        "def wrong_count(completions, **kw):\n    return [1.0]\n"
        "def nan(completions, **kw):\n    return [float('nan')] * len(completions)\n"
        "calls = []\n"
        "def raises(completions, **kw):\n    calls.append(1)\n"
        "    if len(calls) == 3:\n        raise KeyError('answer2')\n    return [float(len(c) % 2) for c in completions]\n"
    )
    for name, expected in [("wrong_count", "returned 1 values for 16 completions"), ("nan", "gave nan for"),
                           ("raises", "raised KeyError")]:
        out = tmp_path / name
        code, _, err = cli(capsys, *grpo_args(out, data, "train.eval_at_start=false", "train.checkpoint_every=1",
                                              f'grpo.rewards=[{{kind: function, function: "{tmp_path}/r.py:{name}"}}]'))
        line = err.strip().splitlines()[-1]  # after the lines every run starts with (parameters, device)
        assert code == 2 and "Traceback" not in err, err
        assert f"reward '{name}'" in line and expected in line and "arith.jsonl:" in line, line
        assert json.loads((out / "run_state.json").read_text())["state"] == "failed"
    # The third call failed: the checkpoint of step 2 is there, whole, to resume from once the reward is fixed.
    assert (tmp_path / "raises" / "checkpoints" / "step-0000002" / "model.safetensors").is_file()


def test_no_prompts_and_a_classifier_start_are_refused(tmp_path, capsys):
    empty = bad(tmp_path, "empty.jsonl", "")
    assert "empty.jsonl" in one_line_error(capsys, *grpo_args(tmp_path / "a", empty))
    from tests.helpers import small_spam_file, tiny_spam_args

    spam = tmp_path / "spam-run"
    assert cli(capsys, *tiny_spam_args(small_spam_file(tmp_path / "spam.tsv", 10), spam, "train.epochs=1"))[0] == 0
    data = arithmetic_file(tmp_path / "arith.jsonl", 20)
    line = one_line_error(capsys, *grpo_args(tmp_path / "b", data, f"model.name={spam}", "model.init=pretrained"))
    assert "is a classifier" in line


def test_the_run_is_used_as_an_instruct_run(tmp_path, capsys):
    """Served, chatted with and exported exactly as an instruct run: `respond` answers as responses.jsonl."""
    data = arithmetic_file(tmp_path / "arith.jsonl", 40)
    out = tmp_path / "run"
    assert cli(capsys, *grpo_args(out, data))[0] == 0
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"instruction": r["instruction"]}) + "\n" for r in responses))
    answers = tmp_path / "answers.jsonl"
    code, _, err = cli(capsys, "respond", str(out), "--data", str(questions), "--out", str(answers))
    assert code == 0, err
    assert [json.loads(line)["response"] for line in answers.read_text().splitlines()] == [
        r["response"] for r in responses
    ]
    assert load_pretrained(out).config.n_embd == 64 and math.isfinite(
        json.loads((out / "metrics.json").read_text())["test"]["reward"]
    )


def test_the_offline_presets_raise_held_out_reward_and_pass_at_1(tmp_path, capsys, monkeypatch):
    """docs/recipes/grpo.md's two commands, as written: the GRPO run's validation reward and pass@1 end well
    above where its start began (measured there: reward 0.17 -> 0.59, pass@1 0% -> 8.7%)."""
    import re
    import shlex
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "recipes" / "grpo.md").read_text()
    block = re.search(r"<!-- test: tests/recipes/test_grpo.py runs this block -->\n```bash\n(.*?)```", page, re.S)
    commands = [line.split("#")[0].split() for line in block.group(1).splitlines() if line.strip()]
    assert [c[:3] for c in commands] == [["finetune", "run", "instruct"], ["finetune", "run", "grpo"]]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        code, _, err = cli(capsys, *shlex.split(" ".join(command[1:])), "--quiet")
        assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "runs/grpo_tiny/metrics.jsonl").read_text().splitlines()]
    start = next(r for r in rows if r["split"] == "val" and r["step"] == 0)
    end = json.loads((tmp_path / "runs/grpo_tiny/metrics.json").read_text())["val"]
    assert end["reward"] > start["reward"] + 0.25, (start["reward"], end["reward"])
    assert end["pass@1"] >= start["pass@1"] + 0.04, (start["pass@1"], end["pass@1"])


def test_two_processes_train_and_evaluate_every_prompt_once(tmp_path):
    """Under `accelerate launch` (2 CPU processes): each samples and scores its own prompts' groups, the
    step's loss and metrics are reduced over both, and evaluation counts each held-out prompt once (the
    repeats accelerate adds to even out the last batch are dropped)."""
    import subprocess

    from tests.training.test_multiprocess import ENV, launch

    data = arithmetic_file(tmp_path / "arith.jsonl", 47)  # 39 train, 4 test, 4 val: uneven over 2 x 3
    out = tmp_path / "two"
    done = subprocess.run(launch(*grpo_args(out, data, "train.eval_batch_size=3")), capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["environment"]["processes"] == 2
    assert metrics["val"]["prompts"] == 4 and metrics["test"]["prompts"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 6))  # 39 / (4 x 2) -> 5 steps


def test_the_start_gives_the_prompt_style_and_eval_needs_only_the_run(tmp_path, capsys):
    """A GRPO run from another language-model run takes that run's prompt style (phi3 here, not the alpaca
    default); `finetune eval` of it gives its metrics.json again, also once its start is deleted."""
    import shutil

    data = arithmetic_file(tmp_path / "arith.jsonl", 40)
    start, run = tmp_path / "start", tmp_path / "run"
    assert cli(capsys, *grpo_args(start, data))[0] == 0
    phi3 = "grpo.rewards=[{kind: function, function: 'tests.recipes.test_grpo:prompted_in_phi3'}]"
    args = [a for a in grpo_args(run, data, f"model.name={start}", "model.init=pretrained", phi3)
            if not a.startswith(("data.prompt_style=", "model.name=gpt2-tiny", "model.init=random"))]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert json.loads((run / "responses.jsonl").read_text().splitlines()[0])["prompt_style"] == "phi3"
    assert json.loads((run / "best" / "config.json").read_text())["prompt_style"] == "phi3"
    expected = json.loads((run / "metrics.json").read_text())
    assert expected["val"]["reward"] == expected["test"]["reward"] == 1.0  # every prompt was asked in phi3
    shutil.rmtree(start)
    code, out, err = cli(capsys, "eval", str(run), "--split", "val", "test", "--json")
    assert code == 0, err
    again = json.loads(out)
    for split in ("val", "test"):
        assert again[split] == expected[split], split
