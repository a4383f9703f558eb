import gc
import subprocess
import sys


def test_freeze_moves_startup_objects_out_of_gc_walks():
    # in a fresh interpreter, so this test's process keeps its normal GC
    code = ("import gc\nfrom tandem.common.gcutil import freeze_startup_objects\n"
            "keep = [[i] for i in range(50000)]\n"
            "before = len(gc.get_objects())\nn = freeze_startup_objects()\nafter = len(gc.get_objects())\n"
            "print(n, before, after)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    frozen, before, after = map(int, out)
    assert frozen >= 50000
    assert after < before - 50000      # the frozen lists are no longer visited by collections
    assert gc.isenabled()
