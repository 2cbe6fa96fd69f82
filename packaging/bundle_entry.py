"""Entry point of the PyInstaller bundle: one program, two CNI types.

CNI runtimes find a plugin by file name and exec it with argv[0] set to its
path, so `cni-ipam` is a second name (hard link or copy) of the same program
and the name it was started under picks the entry point.
"""
import os
import sys


def _entry() -> int:
    name = os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else sys.executable)
    if name == "cni-ipam" or name.startswith("cni-ipam."):
        from ipam.main import main
    else:
        from cni_bridge.main import main
    return main()


if __name__ == "__main__":
    sys.exit(_entry())
