import os
import pty
import subprocess
import sys

CODE = "from lssfl.common.progress import progress\nprint(sum(progress(range(5), 5, 'x', ' b')))\n"


def test_bar_draws_on_a_terminal_and_stays_silent_in_a_pipe():
    piped = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert piped.stdout == "10\n" and piped.stderr == ""
    main, child = pty.openpty()
    subprocess.run([sys.executable, "-c", CODE], stderr=child, stdout=subprocess.DEVNULL)
    os.close(child)
    drawn = os.read(main, 4096).decode()
    os.close(main)
    assert "x [" + "#" * 30 + "] 5/5 b" in drawn


STREAM = (
    "from lssfl.common.progress import progress\n"
    "print(sum(progress(iter(range({n})), 0, 'round 1 upload', ' messages')))\n"
)


def _drawn(code: str) -> str:
    main, child = pty.openpty()
    subprocess.run([sys.executable, "-c", code], stderr=child, stdout=subprocess.DEVNULL)
    os.close(child)
    try:
        drawn = os.read(main, 4096).decode()
    except OSError:  # EIO: the child wrote nothing and is gone
        drawn = ""
    os.close(main)
    return drawn


def test_a_stream_counts_in_words_on_one_redrawn_line():
    one = _drawn(STREAM.format(n=1))
    assert one == "\rround 1 upload 1 message\x1b[K\r\n"  # the pty turns \n into \r\n
    many = _drawn(STREAM.format(n=3))
    assert many.endswith("3 messages\x1b[K\r\n") and many.count("\n") == 1
    assert _drawn(STREAM.format(n=0)) == ""  # nothing drawn, no stray blank line
