"""mltk.ctrl_c: a Ctrl-C is never lost (one Python drops in a finalizer is remembered, by every enclosing block) and never
lands inside a checkpoint being written (it is held, and raised once the file is whole)."""

import os
import signal
import sys
from types import SimpleNamespace

import pytest
import torch

from mltk import ctrl_c
from mltk.checkpoint import save_checkpoint


@pytest.fixture(autouse=True)
def as_from_a_terminal():
    """SIGINT raises KeyboardInterrupt, as in a terminal (the suite may run with it ignored, under nohup)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def press() -> None:
    """Ctrl-C: SIGINT to this process; Python runs its handler at the next bytecode."""
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):  # the handler runs between these
        pass


class PressesCtrlC:
    def __del__(self):
        press()  # the handler raises in here: Python drops it ("Exception ignored in ...")


def test_a_press_raises_at_once_and_is_remembered():
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c.remembered() as pressed:
            assert not pressed()
            press()
    assert pressed()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_press_python_drops_in_a_finalizer_is_remembered_by_every_enclosing_block_and_not_shown(monkeypatch):
    shown = []
    monkeypatch.setattr(sys, "unraisablehook", shown.append)
    with ctrl_c.remembered(raise_now=False) as outer:
        with ctrl_c.remembered() as inner:
            PressesCtrlC()  # its finalizer runs now, and the KeyboardInterrupt raised in it goes nowhere
            assert inner() and outer()
        assert sys.unraisablehook is not shown.append
    assert sys.unraisablehook == shown.append and shown == []  # the hook put back; Python's message spared
    with ctrl_c.remembered():
        sys.unraisablehook(SimpleNamespace(exc_value=ValueError("dropped in another finalizer")))
    assert [type(d.exc_value) for d in shown] == [ValueError]  # anything else still reaches the hook


def test_without_raise_now_a_press_is_only_remembered():
    with ctrl_c.remembered(raise_now=False) as pressed:
        press()
        assert pressed()  # no KeyboardInterrupt: the code asks at its safe points


def test_a_press_the_caller_ignores_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with ctrl_c.remembered() as pressed:
        press()
    assert not pressed() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_press_during_a_deferred_block_is_raised_after_it():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c.deferred():
            press()
            done.append("the rest of the block")
    assert done == ["the rest of the block"]
    with pytest.raises(KeyboardInterrupt):  # inside a run: the run remembers it too
        with ctrl_c.remembered() as run:
            with ctrl_c.deferred():
                press()
                done.append("again")
    assert done[-1] == "again" and run()
    with ctrl_c.remembered(raise_now=False) as search:  # where the enclosing block only remembers, so does this one
        with ctrl_c.deferred():
            press()
    assert search()


def test_a_press_while_a_checkpoint_is_written_comes_after_it_and_the_file_is_whole(tmp_path, monkeypatch):
    """In torch's C++ zip writer a KeyboardInterrupt surfaced as a RuntimeError ('unexpected pos') and a traceback."""
    real_save = torch.save

    def pressed_while_saving(obj, f):
        press()
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", pressed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 1, "model": {"w": torch.ones(1000, 100)}}, tmp_path / "last.pt")
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["model"]["w"], torch.ones(1000, 100))
