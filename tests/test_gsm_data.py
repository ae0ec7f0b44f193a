"""GSM data: a template-disjoint split, the paper's prompt, targets that check themselves."""
import pytest

gsm = pytest.importorskip("proxytune.datasets.gsm")
pytest.importorskip("reasoning_gym")


def test_train_and_heldout_templates_are_disjoint_and_cover_the_usable_ones():
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    assert not set(gsm.TRAIN_TEMPLATES) & set(gsm.HELDOUT_TEMPLATES)
    assert set(gsm.TRAIN_TEMPLATES) | set(gsm.HELDOUT_TEMPLATES) == set(tasks_ok)


def test_examples_come_only_from_their_split():
    assert {e.template for e in gsm.train_examples(200, seed=3)} <= set(gsm.TRAIN_TEMPLATES)
    assert {e.template for e in gsm.heldout_examples(50, seed=3)} == set(gsm.HELDOUT_TEMPLATES)


def test_recipes_are_chosen_on_training_templates_only():
    # validation (where a learning rate or rank is chosen) and fit (what is trained meanwhile) split TRAIN;
    # HELD-OUT is never part of either
    assert set(gsm.VALIDATION_TEMPLATES) | set(gsm.FIT_TEMPLATES) == set(gsm.TRAIN_TEMPLATES)
    assert not set(gsm.VALIDATION_TEMPLATES) & set(gsm.FIT_TEMPLATES)
    assert {e.template for e in gsm.fit_examples(300, seed=0)} == set(gsm.FIT_TEMPLATES)
    assert {e.template for e in gsm.validation_examples(48, seed=0)} == set(gsm.VALIDATION_TEMPLATES)


def test_same_seed_same_examples_other_seed_other_examples():
    assert gsm.heldout_examples(5, seed=1) == gsm.heldout_examples(5, seed=1)
    assert gsm.heldout_examples(5, seed=1) != gsm.heldout_examples(5, seed=2)


def test_prompt_is_the_papers_zero_shot_prompt_and_target_ends_in_the_answer():
    example = gsm.train_examples(1, seed=0)[0]
    assert example.prompt == f"Answer the following question.\n\nQuestion: {example.question}\nAnswer:"
    assert "Give the result as your final answer" not in example.prompt
    assert example.target.endswith(f"\n#### {example.answer}")
    assert example.row() == {"prompt": example.prompt, "completion": " " + example.target}


def test_every_target_is_scored_correct_against_its_own_answer():
    for example in gsm.train_examples(150, seed=0) + gsm.heldout_examples(60, seed=0):
        assert gsm.is_correct(example.target, example.answer), example


@pytest.mark.parametrize("text, expected", [
    ("3 + 4 = 7\n#### 7", "7"),
    ("so 1,200 in all\n#### 1,200 dollars", "1200"),
    ("#### 16.0", "16"),
    ("#### -3", "-3"),
    ("she has 5 apples, then 12 apples.", "12"),
    ("no numbers here", None),
])
def test_answer_extraction_prefers_the_number_after_hashes_else_the_last_number(text, expected):
    assert gsm.extract_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("25 * 5 = 125, so \\[ \\boxed{290} \\] minutes. Then 3 more questions and 7", "290"),
    ("\\boxed{\\$1,250} and later \\boxed{3}", "1250"),
    ("#### 5 (or \\boxed{7})", "5"),
    ("no box: 4 then 9", "9"),
])
def test_the_lenient_diagnostic_also_reads_the_first_boxed_answer(text, expected):
    assert gsm.extract_answer_lenient(text) == expected
    assert gsm.is_correct(text, expected, lenient=True)


def test_wrong_or_missing_answers_are_not_correct():
    assert not gsm.is_correct("#### 8", "7")
    assert not gsm.is_correct("I don't know", "7")
    assert gsm.is_correct("#### 7.0", "7")
