"""``python -m thsrn_lib.train ...`` (and ``torchrun ... -m thsrn_lib.train ...``) is ``thsrn train ...``."""
import sys

from thsrn_lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
