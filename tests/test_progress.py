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
