"""Token-level DPO: pairs at the policy's own errors (exact ids), the scorer inside TRL's DPOTrainer, a step that
raises the margin, and the command line."""

import json
import types

import pytest
import torch
from safetensors.torch import load_file

from halluc_rl.agents import dpo
from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.problems import Problem, encode_problem
from halluc_rl.modeling import load_policy
from halluc_rl.pairs import ErrorPoint, Samples, _oracle_trace, build_pairs, find_errors
from halluc_rl.rewards import HFProcessReward, OracleProcessReward
from halluc_rl.rollout import rollout
from halluc_rl.scoring import score_actions
from tests.conftest import make_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROBLEM = Problem("Tom has 3 apples and buys 4 more. How many?", "3 + 4 = 7\n#### 7", "7")


def hand_samples(tokenizer):
    """One answer that types " 3 + 4 = 8" (the error), then goes on " \\n"; one answer that is right."""
    prompt, ref = encode_problem(PROBLEM, tokenizer)
    eight = tokenizer("8", add_special_tokens=False)["input_ids"][-1]
    seven = ref.index(tokenizer("7", add_special_tokens=False)["input_ids"][-1])  # where " = 7" has its 7
    wrong = [*ref[:seven], eight, *ref[seven + 1 : seven + 3]]  # the error, then two more tokens of its own
    error = ErrorPoint(PROBLEM, prompt, wrong, seven, 1, 1.0)
    return Samples([error], [(1, 1), (1, 2)], [prompt, prompt], [wrong, list(ref)], [PROBLEM, PROBLEM], 2), ref, seven


def test_single_action_and_continuation_pairs_have_exact_ids(tokenizer):
    samples, ref, at = hand_samples(tokenizer)
    bt = backtrack_token_id(tokenizer)
    prompt = samples.prompts[0]
    wrong = samples.actions[0]
    single = build_pairs(samples, tokenizer, bt, form="single", counter_ratio=0)
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.floor, p.kind) for p in single] == [
        (prompt + wrong[: at + 1], [bt], [wrong[at + 1]], len(prompt), "error")]
    cont = build_pairs(samples, tokenizer, bt, form="continuation", counter_ratio=0)
    assert cont[0].chosen_ids == [bt, *ref[at:]]  # delete the 8, then the reference from its 7 on
    assert cont[0].rejected_ids == wrong[at + 1 :]
    counters = build_pairs(samples, tokenizer, bt, counter_ratio=2.0)[1:]
    assert sorted((c.prompt_ids, c.chosen_ids, c.rejected_ids) for c in counters) == sorted(
        (prompt + ref[:t], [ref[t]], [bt]) for t in (1, 2))


def test_the_oracle_finds_the_first_error_and_too_few_errors_are_explained(tokenizer):
    samples, ref, at = hand_samples(tokenizer)
    bt = backtrack_token_id(tokenizer)
    oracle = OracleProcessReward(tokenizer)
    reference = " " + PROBLEM.solution
    trace = _oracle_trace(oracle, tokenizer, samples.actions[0], reference, bt)
    assert trace.index(False) == at and all(trace[:at])
    trace = _oracle_trace(oracle, tokenizer, [*samples.actions[0][: at + 1], bt, ref[at]], reference, bt)
    assert trace[-2:] == [True, True]  # deleting the error, then the right digit: back on the reference
    with pytest.raises(ValueError, match=r"only 1 error pairs from 2 sampled answers.*higher temperature"):
        build_pairs(samples, tokenizer, bt, min_pairs=5)


def test_find_errors_on_a_policy_sample_matches_the_oracle(tokenizer):
    model = make_model("llama", tokenizer, seed=4)
    problems = ArithmeticTask(seed=0).problems("train", 4)
    samples = find_errors(model, tokenizer, problems, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert samples.num_samples == 8 and samples.errors  # a random policy errs at once
    for e in samples.errors:
        ok = _oracle_trace(OracleProcessReward(tokenizer), tokenizer, e.actions, " " + e.problem.solution,
                           backtrack_token_id(tokenizer))
        assert not ok[e.end] and all(ok[: e.end])


def tiny_trainer(tmp_path, tokenizer, pairs_rows, **config):
    model = make_model("llama", tokenizer, hidden_size=32)
    from halluc_rl.adapters import make_lora_model
    from halluc_rl.args import LoraArgs

    policy = make_lora_model(model, LoraArgs(lora_r=4), backtrack_token_id(tokenizer))
    import datasets

    args = dpo.DPOConfig(output_dir=str(tmp_path), max_steps=config.pop("max_steps", 1), learning_rate=0.05,
                         per_device_train_batch_size=len(pairs_rows), report_to=[], save_strategy="no",
                         use_cpu=True, logging_steps=1, disable_tqdm=True, remove_unused_columns=False,
                         activation_checkpointing=False, beta=0.5, **config)
    return dpo.BacktrackDPOTrainer(model=policy, args=args, train_dataset=datasets.Dataset.from_list(pairs_rows),
                                   processing_class=tokenizer,
                                   data_collator=dpo.PreferenceCollator(pad_token_id=tokenizer.pad_token_id))


def test_dpo_log_probs_come_from_the_scorer_and_equal_the_rollouts(tmp_path, tokenizer):
    """The rejected side is the policy's own sampled continuation (with a backtrack in it): the trainer's log-prob
    of it equals the rollout's sampling log-probs, not a concatenated causal forward's."""
    bt = backtrack_token_id(tokenizer)
    model = make_model("llama", tokenizer, hidden_size=32)
    problem = ArithmeticTask(seed=0).problems("train", 1)[0]
    forced = torch.tensor([[-1, -1, -1, bt, -1, -1, bt, -1]])
    ro = rollout(model, tokenizer, [problem], forced_actions=forced, max_new_tokens=8, do_sample=True,
                 loop_guard=None, eos_token_id=[], generator=torch.Generator().manual_seed(0))
    actions = ro.actions[0].tolist()
    prompt = ro.prompt_ids[0]
    row = {"prompt_ids": prompt + actions[:2], "chosen_ids": [bt], "rejected_ids": actions[2:], "floor": len(prompt),
           "kind": "error"}
    trainer = tiny_trainer(tmp_path, tokenizer, [row])  # the same seed's weights; LoRA's B = 0: a no-op
    batch = trainer.data_collator([row])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                            fused_lm_head=True, floor=batch["floor"])
    rejected = out.log_probs[1].sum()
    torch.testing.assert_close(rejected, ro.logprobs[0, 2:].sum(), atol=1e-5, rtol=0)
    with torch.no_grad():  # what a concatenated causal forward would say: the backtrack as an input token
        causal = torch.log_softmax(model(input_ids=batch["input_ids"][1:2]).logits[0, :-1], -1)
        ids = batch["input_ids"][1, 1:]
        naive = causal.gather(1, ids.unsqueeze(1)).squeeze(1)[labels[1, 1:] != -100].sum()
    assert abs(float(naive) - float(rejected)) > 1e-2


def test_a_dpo_step_raises_the_margin_and_trains_the_backtrack_rows(tmp_path, tokenizer):
    samples, ref, at = hand_samples(tokenizer)
    bt = backtrack_token_id(tokenizer)
    rows = [p.as_row() for p in build_pairs(samples, tokenizer, bt, counter_ratio=2.0)]
    trainer = tiny_trainer(tmp_path, tokenizer, rows, max_steps=3)

    def margin():
        base = trainer.model.get_base_model()
        total = 0.0
        for r in rows:
            prompt = r["prompt_ids"][: r["floor"]]
            side = []
            for key in ("chosen_ids", "rejected_ids"):
                stream = torch.tensor([r["prompt_ids"][r["floor"]:] + r[key]])
                with torch.no_grad():
                    lp = score_actions(base, [prompt], stream).logprobs[0, -len(r[key]):].sum()
                side.append(float(lp))
            total += side[0] - side[1]
        return total

    before_params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    before = margin()
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert margin() > before + 0.1
    trained = set()
    for name, param in trainer.model.named_parameters():
        if not torch.equal(before_params[name], param.detach()):
            trained.add(name)
    assert all(".default" in n for n in trained)  # the base and TRL's frozen "ref" copy never move
    assert any("lora_B.default" in n for n in trained)
    assert "base_model.model.lm_head.token_adapter.trainable_tokens_delta.default" in trained  # the backtrack row


def test_dpo_command_continues_an_adapter_and_saves_it(tmp_path, tokenizer):
    from halluc_rl.agents import sft

    base = tmp_path / "base"
    make_model("llama", tokenizer, hidden_size=32).save_pretrained(base)
    tokenizer.save_pretrained(base)
    common = ["--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0"]
    assert sft.main(["--model_name_or_path", str(base), "--output_dir", str(tmp_path / "sft"), "--max_steps", "1",
                     "--num_train_problems", "8", "--per_device_train_batch_size", "4", "--save_strategy", "no",
                     "--backtrack_head", "factorized", *common]) == 0
    out = tmp_path / "dpo"
    code = dpo.main(["--model_name_or_path", str(tmp_path / "sft"), "--output_dir", str(out), "--max_steps", "2",
                     "--num_problems", "8", "--num_samples", "2", "--per_device_train_batch_size", "8",
                     "--max_new_tokens", "24", "--min_pairs", "2", "--rebuild_every", "1", "--save_steps", "1",
                     "--activation_checkpointing", "false", "--learning_rate", "0.01", "--logging_steps", "1", *common])
    assert code == 0
    policy, _, _ = load_policy(out)
    assert policy.config.backtrack_head == "factorized"  # the policy's settings travel through DPO
    saved = load_file(out / "adapter_model.safetensors")
    assert any("trainable_tokens" in k for k in saved) and not (out / "ref").exists()
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2] and all("pairs/errors" in h for h in history
                                                                       if "loss" in h)


def test_dpo_refuses_oracle_settings_on_gsm8k(capsys):
    assert dpo.main(["--task", "gsm8k", "--use_cpu", "true"]) == 2
    assert "locate: oracle and continuation: reference need the offline task" in capsys.readouterr().err


def test_the_reference_of_a_continued_adapter_keeps_its_trained_backtrack_rows(tmp_path, tokenizer):
    from halluc_rl.agents import sft
    from halluc_rl.args import LoraArgs, ModelArgs
    from halluc_rl.config import parse_cli

    base = tmp_path / "base"
    make_model("llama", tokenizer, hidden_size=32).save_pretrained(base)
    tokenizer.save_pretrained(base)
    common = ["--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true"]
    assert sft.main(["--model_name_or_path", str(base), "--output_dir", str(tmp_path / "sft"), "--max_steps", "2",
                     "--num_train_problems", "8", "--per_device_train_batch_size", "4", "--save_strategy", "no",
                     "--learning_rate", "0.05", *common]) == 0
    parsed = parse_cli([dpo.DPOScriptArgs, ModelArgs, LoraArgs, dpo.DPOConfig],
                       ["--model_name_or_path", str(tmp_path / "sft"), "--output_dir", str(tmp_path / "d"),
                        "--num_problems", "4", "--num_samples", "2", "--max_new_tokens", "16", "--min_pairs", "1",
                        *common], prog="test")
    trainer = dpo.build_trainer(*parsed)
    params = dict(trainer.model.named_parameters())
    rows = [n for n in params if "trainable_tokens_delta.default" in n]
    assert rows and all(torch.equal(params[n], params[n[: -len("default")] + "ref"]) for n in rows)
    assert any(params[n].abs().sum() > 0 for n in rows)  # the SFT run trained them: the copy is not trivially equal


def test_counter_pairs_never_ask_to_backtrack_on_an_empty_answer(tokenizer):
    """A backtrack on an empty answer is masked (log-prob -inf): such a counter-pair would make DPO's loss NaN."""
    from halluc_rl.pairs import _counter_states

    bt = backtrack_token_id(tokenizer)
    assert _counter_states(5, [7, bt, 8, 9, bt, 10], bt) == [(5, 3), (5, 5)]


class LineModel(torch.nn.Module):
    """A mock PRM backbone: at each position, the logit of ``bad`` once the answer so far holds text the oracle
    rejects, else of ``good`` (one label, read through a sigmoid); it counts its forwards."""

    def __init__(self, tokenizer, prompt, good, bad):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # for the scorer's device lookup
        self.tokenizer, self.prompt, self.calls = tokenizer, prompt, 0
        self.good, self.bad = torch.logit(torch.tensor(good)), torch.logit(torch.tensor(bad))
        self.oracle = OracleProcessReward(tokenizer)

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, 1)  # [B, T, 1]
        for b, row in enumerate(input_ids.tolist()):
            assert row[: len(self.prompt)] == self.prompt  # scored as prompt + answer
            for t in range(len(self.prompt) - 1, int(attention_mask[b].sum())):
                text = self.tokenizer.decode(row[len(self.prompt) : t + 1], skip_special_tokens=True)
                logits[b, t, 0] = self.good if self.oracle.on_track(text, " " + PROBLEM.solution) else self.bad
        return types.SimpleNamespace(logits=logits)


def test_prm_errors_are_the_first_step_scored_below_the_threshold(tokenizer):
    from halluc_rl.pairs import _step_value_errors

    samples, ref, at = hand_samples(tokenizer)
    bt = backtrack_token_id(tokenizer)
    prompt, (wrong, right) = samples.prompts[0], samples.actions
    newline = next(t for t in range(at, len(wrong)) if "\n" in tokenizer.decode([wrong[t]]))
    backbone = LineModel(tokenizer, prompt, good=0.6, bad=0.4)  # a soft PRM: its score drops by 0.2 only
    prm = HFProcessReward(backbone)
    errors, counters = _step_value_errors(None, tokenizer, [PROBLEM, PROBLEM], [prompt, prompt], [wrong, right], bt,
                                          k=0, min_drop=0.5, config=None, generator=None, batch_size=8, prm=prm,
                                          prm_threshold=0.5)
    assert backbone.calls == 1  # both answers, every state, in one forward: no re-encoding per state
    assert [(e.actions, e.end, e.length) for e in errors] == [(wrong, newline, newline + 1)]
    assert errors[0].drop == pytest.approx(0.6)
    assert counters == [(1, t) for t in range(1, len(right))]  # none from the wrong answer's first line
    with pytest.raises(ValueError, match="give prm exactly when locate='prm'"):
        find_errors(None, tokenizer, [PROBLEM], locate="prm")


def test_dpo_refuses_locate_prm_without_a_prm(capsys):
    assert dpo.main(["--locate", "prm", "--output_dir", "/nonexistent/x"]) == 2
    assert "prm_path: locate: prm needs a PRM directory" in capsys.readouterr().err
