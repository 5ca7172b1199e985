from truncation_curve import curve


def test_a_budget_cuts_answers_at_or_over_it_and_their_correctness():
    records = [{"tokens": 10, "correct": True}, {"tokens": 20, "correct": True},
               {"tokens": 30, "correct": False}, {"tokens": 40, "correct": True}]
    rows = curve(records, [20, 41])
    assert rows[0] == {"max_new_tokens": 20, "truncated": 0.75, "accuracy_lower_bound": 0.25}
    assert rows[1] == {"max_new_tokens": 41, "truncated": 0.0, "accuracy_lower_bound": 0.75}
