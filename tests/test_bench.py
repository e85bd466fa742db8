"""The bench's timing schedule (no timings are asserted: only which timer runs when, and what
is kept)."""

from bench.__main__ import interleaved


def _timer(name, values, log):
    it = iter(values)

    def call():
        log.append(name)
        return next(it)

    return call


def test_interleaved_takes_parts_in_turn_and_keeps_each_parts_best():
    log = []
    timers = {
        "sweep": [_timer("s0", [3.0, 1.0, 2.0], log), _timer("s1", [5.0, 6.0, 4.0], log)],
        "peak": _timer("p", [0.5, 0.25, 0.75], log),
    }
    rounds: dict = {}
    best = interleaved(timers, repeat=3, rounds=rounds)
    # each part's best, summed: 1 + 4 for the sweep, 0.25 for the single timer
    assert best == {"sweep": 5.0, "peak": 0.25}
    # and every round's total, in order
    assert rounds == {"sweep": [8.0, 7.0, 6.0], "peak": [0.5, 0.25, 0.75]}
    # round by round, part i of every timer before part i + 1 of any
    assert log == ["s0", "p", "s1"] * 3
