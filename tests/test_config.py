import pytest

from adaptive_drafter import SpecConfig


def test_defaults_are_lossless_and_speculate_only_where_it_pays():
    config = SpecConfig()
    assert config.acceptance == "exact" and config.num_draft_tokens >= 1
    assert config.elastic  # an untrained drafter must not cost users who never read the docs: fixed k is opt-in


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_draft_tokens": 0}, "num_draft_tokens must be >= 1"),
        ({"num_draft_tokens": -3}, "num_draft_tokens must be >= 1"),
        ({"acceptance": "typical"}, "Unknown acceptance rule 'typical'"),
        ({"lenience": 0.5}, "lenience must be >= 1"),
        ({"cascade_threshold": 1.5}, "cascade_threshold must lie in"),
        ({"vocab_size": 0}, "vocab_size must be positive"),
        ({"compact_threshold": 0.0}, "compact_threshold must lie in"),
    ],
)
def test_impossible_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpecConfig(**kwargs)


def test_spec_stats_add_up():
    from adaptive_drafter import SpecStats

    total = SpecStats(drafted=4, accepted=3, verify_steps=1, verified_tokens=4) + SpecStats(
        drafted=4, verify_steps=1, verified_tokens=1
    )
    assert (total.drafted, total.accepted, total.verify_steps) == (8, 3, 2)
    assert total.acceptance_rate == 3 / 8 and total.tokens_per_verify == 2.5
