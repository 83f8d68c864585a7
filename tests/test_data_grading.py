import json

import pytest

from halluc_rl.data.grading import evaluate, extract_answer, extract_hash_answer, normalize_number, reward


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        ("#### 5\nThe answer is 6", "5"),  # #### wins over 'The answer is'
        ("So 3 + 4 = 7. The answer is 7. Then 9 more.", "7"),  # 'The answer is' wins over the last number
        ("the final answer is: $1,000.", "1,000"),
        # two 'The answer is': the last one (a model that corrects itself), even before a later bare number
        ("The answer is 5. Wait, 3 + 4 = 7, so the answer is 7. Check: 7 - 4 = 3", "7"),
        ("The answer is 12.\nNo: the final answer is -2.\n", "-2"),
        ("I got 3, then 4, then 12 apples", "12"),  # else the last number
        ("it went from 5-3=2", "2"),
        ("it is -4", "-4"),
        ("#### -15", "-15"),
        ("#### $2,520,000", "2,520,000"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_evaluate_grades_the_last_the_answer_is():
    assert evaluate("The answer is 5. Wait, 3 + 4 = 7, so the answer is 7.", "7")
    assert not evaluate("The answer is 7. Wait, 3 + 4 = 8, so the answer is 8.", "7")


def test_extract_hash_answer_needs_the_marker():
    assert extract_hash_answer("so 7\n#### 7") == "7"
    assert extract_hash_answer("The answer is 7") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("72", 72.0),
        ("72.00", 72.0),
        ("1,000", 1000.0),
        ("$1,000.", 1000.0),
        ("-5", -5.0),
        ("3.25", 3.25),
        ("72 apples.", 72.0),
        ("$18 dollars", 18.0),
        (".5", 0.5),
        ("apples", None),
        (None, None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_evaluate_and_reward():
    gold = "She has 20 - 8 = <<20-8=12>>12 left.\n#### 12"
    assert evaluate("20 - 8 = 12\n#### 12", gold)
    assert evaluate("The answer is 12.00", gold)
    assert evaluate("so she has 12 dollars", gold)
    assert not evaluate("#### 13", gold)
    assert not evaluate("I do not know", gold)
    assert evaluate("The answer is $1000.", "1,000")  # bare gold number
    assert evaluate("#### -3", "-3") and not evaluate("#### 3", "-3")
    assert reward("#### 12", gold) == 1.0
    assert reward("#### 11", gold) == 0.0
    with pytest.raises(ValueError, match="no number"):
        evaluate("#### 1", "unknown")


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_gsm8k_gold_answer_grades_correct_against_itself(gsm8k_dir, split):
    rows = [json.loads(line) for line in (gsm8k_dir / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == {"train": 7473, "test": 1319}[split]
    for row in rows:
        answer = row["answer"]
        tail = answer.split("####")[-1].strip()
        value = float(tail.replace(",", ""))
        assert normalize_number(extract_answer(answer)) == value, answer
        assert evaluate(answer, answer), answer
        assert evaluate(answer, tail), answer
        assert not evaluate(answer, str(value + 1)), answer


def test_majority_vote_counts_numbers_not_texts():
    from halluc_rl.data.grading import majority_answer, majority_reward

    texts = ["5 + 2 = 7\n#### 7", "#### 8", "so 7.00 apples", "#### 8", "no number here", "#### 7"]
    assert majority_answer(texts) == 7.0  # 7 three times (7, 7.00, 7), 8 twice; the wordless text does not vote
    assert majority_answer(["#### 8", "#### 7"]) == 8.0  # a tie goes to the answer reached first
    assert majority_answer(["none", "nothing"]) is None
    assert majority_reward(texts, "7") == 1.0 and majority_reward(texts, "8") == 0.0
    assert majority_reward(["none"], "1,000") == 0.0
