"""The key sender: which `keys` message goes out when (plain code, no socket)."""

from client.net import KeySender


def test_key_sender_sends_changes_at_once_and_the_full_set_every_tick():
    ks = KeySender(tick_s=1 / 30)
    assert ks.set({"forward"}, 0.0) is None  # no session yet: nothing to send
    assert ks.due(0.0) is None
    ks.enable(True, 0.0)
    m = ks.due(0.0)
    assert m.seq == 1 and m.held == {"forward"}  # the current state at once
    assert ks.due(0.01) is None  # not due before the tick
    m = ks.due(0.034)
    assert m.seq == 2 and m.held == {"forward"}
    seq = ks.set({"forward", "yaw_left"}, 0.04)
    assert seq == 3
    ks.set_last_shown(12)
    assert ks.set({"forward", "yaw_left"}, 0.041) is None  # unchanged
    m = ks.due(0.041)  # a change goes out without waiting for the tick
    assert (m.seq, m.held, m.client_time) == (3, {"forward", "yaw_left"}, 0.04)
    assert ks.set(set(), 0.05) == 4 and ks.set({"back"}, 0.051) == 4  # merged into the message not sent yet
    m = ks.due(0.052)
    assert (m.seq, m.held) == (4, {"back"})
    m = ks.due(0.1)
    assert m.seq == 5 and m.last_shown_frame == 12  # one higher per message, always the full set
