"""Prompt-lookup drafts (llm.engine.drafting): what is proposed, and how the length adapts."""

import pytest

from llm.engine.drafting import MAX_PAUSE, PromptLookup


def test_the_tail_is_looked_up_in_the_prompt_and_what_followed_it_is_proposed():
    drafter = PromptLookup([1, 2, 3, 4, 5, 6, 7, 9], max_draft=8)
    for token in (2, 3):  # the answer so far: 2 3, which the prompt has, followed by 4 5 6 7
        drafter.extend(token)
    assert drafter.propose() == [4, 5, 6, 7]  # the starting length


def test_the_latest_occurrence_of_the_longest_tail_wins():
    # "5 1 2" and later "8 2" occur: the tail "5 1 2"... is not there, "1 2" is (twice), "2" thrice.
    drafter = PromptLookup([1, 2, 10, 11, 1, 2, 20, 21, 8, 2, 30], max_draft=2)
    drafter.extend(1)
    drafter.extend(2)
    assert drafter.propose() == [20, 21]  # after the latest "1 2", not after the latest "2"


def test_the_tail_never_finds_itself():
    drafter = PromptLookup([7, 8, 9])
    assert drafter.propose() == []  # "9", "8 9", "7 8 9" occur only at the end
    drafter.extend(5)
    assert drafter.propose() == []


def test_a_repeated_run_is_proposed_from_its_own_overlap():
    drafter = PromptLookup([4, 4, 4], max_draft=3)
    assert drafter.propose() == [4]  # "4 4" ends one before the tail; only one token follows it


def test_room_caps_the_draft():
    drafter = PromptLookup([1, 2, 3, 4, 5, 6, 1, 2])
    assert drafter.propose(room=2) == [3, 4]
    assert drafter.propose(room=0) == []


def test_the_length_grows_after_a_draft_taken_whole_and_shrinks_after_a_partial_one():
    drafter = PromptLookup([], max_draft=8)
    assert drafter.length == 4
    drafter.feedback(4, 4)
    assert drafter.length == 6
    drafter.feedback(6, 6)
    drafter.feedback(8, 8)
    assert drafter.length == 8  # capped
    drafter.feedback(8, 2)
    assert drafter.length == 3
    assert (drafter.proposed, drafter.accepted) == (26, 20)


def test_drafts_rejected_in_a_row_pause_drafting_for_longer_and_longer():
    drafter = PromptLookup([1, 2, 3, 1, 2], max_draft=2)
    pauses = []
    for _ in range(8):
        assert drafter.propose() == [3, 1]  # the tail "1 2" occurred before "3 1 2"; 2 at most
        drafter.feedback(2, 0)
        steps = 0
        while drafter.propose() == []:
            steps += 1
        pauses.append(steps)
        drafter.pause = 0
        drafter.length = 2
    assert pauses == [1, 2, 4, 8, 16, 32, MAX_PAUSE, MAX_PAUSE]


def test_an_accepted_token_ends_the_pause_streak():
    drafter = PromptLookup([1, 2, 3, 1, 2], max_draft=4)
    drafter.feedback(2, 0)
    drafter.feedback(2, 0)
    drafter.feedback(2, 1)
    assert drafter.misses == 0
    drafter.pause = 0
    drafter.feedback(2, 0)
    assert drafter.pause == 1


def test_max_draft_must_be_positive():
    with pytest.raises(ValueError, match="max_draft"):
        PromptLookup([], max_draft=0)
