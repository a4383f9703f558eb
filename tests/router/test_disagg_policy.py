"""Where a prompt is prefilled (tandem.router.disagg): the one rule the frontend and the sim share."""
import pytest

from tandem.router.disagg import DisaggPolicy


def test_short_uncached_prompts_prefill_on_the_decode_worker():
    p = DisaggPolicy(local_prefill_max_tokens=256)
    assert p.local_reason(256, "batch", 0, 0) == "local_short_uncached"
    assert p.local_reason(257, "interactive", 0, 0) is None


def test_a_long_prefill_queue_moves_chat_prompts_and_batch_only_with_spill():
    off, on = DisaggPolicy(), DisaggPolicy(spill_batch=True)
    # the prefill worker has 40k tokens queued; the decode worker 1k plus this 3k prompt: 40k > 4 x 4k
    for pol in (off, on):
        assert pol.local_reason(3000, "interactive", 40_000, 1_000) == "local_prefill_queue_long"
        assert pol.local_reason(3000, "interactive", 16_000, 1_000) is None      # 16k <= 4 x 4k
    assert off.local_reason(3000, "batch", 40_000, 1_000) is None
    assert on.local_reason(3000, "batch", 40_000, 1_000) == "local_prefill_queue_long"
    assert not DisaggPolicy(prefill_queue_factor=0, spill_batch=True).may_spill("interactive")


def test_short_batch_answers_stay_on_the_prefill_worker():
    p = DisaggPolicy(batch_on_prefill_max_tokens=256)
    assert p.stays_on_prefill("batch", 128)
    assert not p.stays_on_prefill("batch", 300) and not p.stays_on_prefill("interactive", 16)
    assert not p.stays_on_prefill("batch", None)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        DisaggPolicy(prefill_queue_factor=-1)
    with pytest.raises(ValueError):
        DisaggPolicy(local_prefill_max_tokens=-5)
