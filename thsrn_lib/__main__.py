"""``python -m thsrn_lib`` is the ``thsrn`` command."""
import sys

from .cli import main

sys.exit(main())
