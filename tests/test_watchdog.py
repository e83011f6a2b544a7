"""The step watchdog's decisions (meshtui/watchdog.py) and the rejoin hold-out (meshtui/rejoin.py): pure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshtui.rejoin import RejoinPolicy
from meshtui.stats import p95
from meshtui.watchdog import StageClock, StallPolicy, Verdict, judge

POLICY = StallPolicy(factor=4.0, floor=0.25, first_step=2.0, load_deadline=20.0, probe_floor=0.5,
                     probe_rtt_factor=20.0, ceiling=300.0)


def test_the_step_deadline_follows_the_stages_own_p95_with_a_floor() -> None:
    assert POLICY.step_deadline([]) == 2.0  # nothing measured yet: the prompt's prefill may be long
    assert POLICY.step_deadline([5.0] * 50) == 0.25  # 4 x 5 ms is under the floor
    assert POLICY.step_deadline([100.0] * 19 + [900.0]) == 0.4  # p95 of 20 samples is the 19th: 100 ms
    assert POLICY.step_deadline([100.0] * 18 + [900.0, 900.0]) == 3.6


def test_a_step_of_many_usual_steps_work_gets_as_many_deadlines() -> None:
    assert POLICY.step_deadline([5.0] * 50, scale=120.0) == 30.0  # a prompt chunk: 120 decode steps' bytes
    assert POLICY.step_deadline([100.0] * 20, scale=2.5) == 1.0
    assert POLICY.step_deadline([], scale=3.0) == 6.0


def test_the_probe_timeout_grows_with_the_hosts_round_trip() -> None:
    assert POLICY.probe_timeout(None) == 0.5
    assert POLICY.probe_timeout(2.0) == 0.5
    assert POLICY.probe_timeout(100.0) == 2.0


def test_a_stall_goes_fine_then_probe_then_wait() -> None:
    waiting = StageClock(waiting_since=10.0, deadline=0.25)
    assert judge(POLICY, StageClock(None, 0.25), 99.0) is Verdict.FINE
    assert judge(POLICY, waiting, 10.2) is Verdict.FINE
    assert judge(POLICY, waiting, 10.3) is Verdict.PROBE
    assert judge(POLICY, StageClock(10.0, 0.25, probing=True), 10.6) is Verdict.WAIT
    # The agent answered at 10.6: slow, not lost. Asked again a deadline later while the step stays overdue.
    answered = StageClock(10.0, 0.25, last_pong=10.6)
    assert judge(POLICY, answered, 10.8) is Verdict.WAIT
    assert judge(POLICY, answered, 10.9) is Verdict.PROBE
    # Answering pings does not keep a stage that never answers its step forever.
    assert judge(POLICY, StageClock(10.0, 0.25, last_pong=309.9), 310.1) is Verdict.LOST


@given(st.floats(0.0, 1e6), st.floats(0.01, 100.0), st.floats(0.0, 1e3), st.booleans())
def test_nothing_happens_within_the_deadline(since: float, deadline: float, waited: float, probing: bool) -> None:
    now = since + min(waited, deadline) * 0.999  # (clear of float rounding at the edge)
    verdict = judge(POLICY, StageClock(since, deadline, probing=probing), now)
    assert verdict is Verdict.FINE


@given(st.lists(st.floats(0.0, 1e4), min_size=1, max_size=300))
def test_p95_is_the_sample_of_rank_95_percent_rounded(values: list[float]) -> None:
    worst = p95(values)
    rank = max(1, round(0.95 * len(values)))
    assert worst in values
    assert sum(v <= worst for v in values) >= rank
    assert sum(v < worst for v in values) < rank


def test_a_flapping_host_is_held_out_longer_each_time() -> None:
    policy = RejoinPolicy(first_delay=5.0, max_hold=600.0, flap_window=1800.0)
    assert policy.hold_out([], 0.0) == 5.0
    assert policy.hold_out([100.0], 100.0) == 5.0
    assert policy.hold_out([100.0, 200.0], 200.0) == 10.0
    assert policy.hold_out([100.0, 200.0, 300.0, 400.0], 400.0) == 40.0
    assert policy.hold_out([float(t) for t in range(20)], 20.0) == 600.0  # capped
    assert policy.hold_out([0.0, 10.0, 2000.0], 2000.0) == 5.0  # old losses are forgiven
    assert [policy.retry_delay(n) for n in (1, 2, 3, 4, 5)] == [10.0, 20.0, 40.0, 60.0, 60.0]
